//! One error type for the SQL layer: every failure carries a SQLSTATE and a message
//! naming the offending field or object.

use pgrx::pg_sys::panic::ErrorReport;
use pgrx::PgSqlErrorCode;

use crate::schedule::ScheduleError;

#[derive(Debug, thiserror::Error)]
pub enum MeterError {
    /// A bad argument value (22023).
    #[error("{0}")]
    InvalidParameter(String),
    /// A named object that does not exist (42704).
    #[error("{0}")]
    NotFound(String),
    /// Creating something that already exists (42710).
    #[error("{0}")]
    AlreadyExists(String),
    /// Removing or changing something others depend on (2BP01).
    #[error("{0}")]
    InUse(String),
    /// An operation the object's current state does not allow (55000).
    #[error("{0}")]
    WrongState(String),
    /// Another run holds what this one needs (55P03).
    #[error("{0}")]
    Busy(String),
    #[error("internal error: {0}")]
    Spi(#[from] pgrx::spi::Error),
}

impl MeterError {
    pub fn sqlstate(&self) -> PgSqlErrorCode {
        use PgSqlErrorCode::*;
        match self {
            MeterError::InvalidParameter(_) => ERRCODE_INVALID_PARAMETER_VALUE,
            MeterError::NotFound(_) => ERRCODE_UNDEFINED_OBJECT,
            MeterError::AlreadyExists(_) => ERRCODE_DUPLICATE_OBJECT,
            MeterError::InUse(_) => ERRCODE_DEPENDENT_OBJECTS_STILL_EXIST,
            MeterError::WrongState(_) => ERRCODE_OBJECT_NOT_IN_PREREQUISITE_STATE,
            MeterError::Busy(_) => ERRCODE_LOCK_NOT_AVAILABLE,
            MeterError::Spi(_) => ERRCODE_INTERNAL_ERROR,
        }
    }
}

impl From<ScheduleError> for MeterError {
    fn from(e: ScheduleError) -> Self {
        MeterError::InvalidParameter(e.to_string())
    }
}

impl From<MeterError> for ErrorReport {
    fn from(e: MeterError) -> Self {
        ErrorReport::new(e.sqlstate(), e.to_string(), "meter_ext")
    }
}

pub type Result<T> = std::result::Result<T, MeterError>;

/// What `#[pg_extern]`s return: pgrx raises an `ErrorReport` with its own SQLSTATE.
pub type SqlResult<T> = std::result::Result<T, ErrorReport>;
