//! Sessions (SPEC §6): the thirteen statuses of Zuora's meter sessions and every
//! transition between them, in one place.
//!
//! Pure Rust, no Postgres. `sessions.rs` applies a transition to a stored session
//! only after `check_transition` allowed it.

use std::fmt;
use std::str::FromStr;

#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Status {
    NeverRun,
    Testing,
    TestingPassed,
    TestingFailed,
    Initializing,
    Running,
    Paused,
    UsagePushing,
    PushCompleted,
    ConsumeCompleted,
    Completed,
    Failed,
    Canceled,
}

pub const ALL_STATUSES: [Status; 13] = [
    Status::NeverRun,
    Status::Testing,
    Status::TestingPassed,
    Status::TestingFailed,
    Status::Initializing,
    Status::Running,
    Status::Paused,
    Status::UsagePushing,
    Status::PushCompleted,
    Status::ConsumeCompleted,
    Status::Completed,
    Status::Failed,
    Status::Canceled,
];

impl Status {
    pub fn name(self) -> &'static str {
        match self {
            Status::NeverRun => "NEVER_RUN",
            Status::Testing => "TESTING",
            Status::TestingPassed => "TESTING_PASSED",
            Status::TestingFailed => "TESTING_FAILED",
            Status::Initializing => "INITIALIZING",
            Status::Running => "RUNNING",
            Status::Paused => "PAUSED",
            Status::UsagePushing => "USAGE_PUSHING",
            Status::PushCompleted => "PUSH_COMPLETED",
            Status::ConsumeCompleted => "CONSUME_COMPLETED",
            Status::Completed => "COMPLETED",
            Status::Failed => "FAILED",
            Status::Canceled => "CANCELED",
        }
    }

    /// A final status never changes again.
    pub fn is_final(self) -> bool {
        matches!(
            self,
            Status::TestingPassed | Status::TestingFailed | Status::Completed | Status::Failed | Status::Canceled
        )
    }

    /// The statuses in which a run is doing its work (and holds its stream): one
    /// NORMAL run per stream may be in one of these at a time. A session waiting
    /// for its consumers (PUSH_COMPLETED) no longer holds the stream.
    pub fn is_working(self) -> bool {
        matches!(
            self,
            Status::Initializing | Status::Running | Status::Paused | Status::UsagePushing
        )
    }
}

impl fmt::Display for Status {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.name())
    }
}

#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("\"{0}\" is not a session status: use one of NEVER_RUN, TESTING, TESTING_PASSED, TESTING_FAILED, INITIALIZING, RUNNING, PAUSED, USAGE_PUSHING, PUSH_COMPLETED, CONSUME_COMPLETED, COMPLETED, FAILED, CANCELED")]
pub struct UnknownStatus(pub String);

impl FromStr for Status {
    type Err = UnknownStatus;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        let upper = s.trim().to_ascii_uppercase();
        ALL_STATUSES
            .into_iter()
            .find(|st| st.name() == upper)
            .ok_or_else(|| UnknownStatus(s.to_string()))
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum RunType {
    Normal,
    Debug,
}

impl RunType {
    pub fn name(self) -> &'static str {
        match self {
            RunType::Normal => "NORMAL",
            RunType::Debug => "DEBUG",
        }
    }

    /// The status a new session of this run type starts in.
    pub fn first_status(self) -> Status {
        match self {
            RunType::Normal => Status::Initializing,
            RunType::Debug => Status::Testing,
        }
    }
}

impl fmt::Display for RunType {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.name())
    }
}

#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("run_type \"{0}\" is not supported: use NORMAL or DEBUG")]
pub struct UnknownRunType(pub String);

impl FromStr for RunType {
    type Err = UnknownRunType;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        match s.trim().to_ascii_uppercase().as_str() {
            "NORMAL" => Ok(RunType::Normal),
            // Zuora calls DEBUG runs "testing"; both names are accepted.
            "DEBUG" | "TESTING" => Ok(RunType::Debug),
            _ => Err(UnknownRunType(s.to_string())),
        }
    }
}

/// Batch streams run in sessions that end; a realtime stream has one long session.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum SessionKind {
    Batch,
    Realtime,
}

#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("session {session} cannot go from {from} to {to}{hint}")]
pub struct TransitionRefused {
    pub session: i64,
    pub from: Status,
    pub to: Status,
    pub hint: String,
}

/// Whether a session of this run type and kind may move from `from` to `to`.
///
/// Every session starts at NEVER_RUN.
/// - DEBUG: `TESTING → TESTING_PASSED | TESTING_FAILED`.
/// - NORMAL batch: `INITIALIZING → RUNNING (⇄ PAUSED) → USAGE_PUSHING →
///   PUSH_COMPLETED → [CONSUME_COMPLETED →] COMPLETED`.
/// - NORMAL realtime: `INITIALIZING → RUNNING (⇄ PAUSED) → COMPLETED` (stopped).
/// - Any non-final status → FAILED or CANCELED.
pub fn allowed(run_type: RunType, kind: SessionKind, from: Status, to: Status) -> bool {
    use Status::*;
    if from.is_final() {
        return false;
    }
    if from != NeverRun && matches!(to, Failed | Canceled) {
        return true;
    }
    match run_type {
        RunType::Debug => matches!(
            (from, to),
            (NeverRun, Testing) | (Testing, TestingPassed | TestingFailed)
        ),
        RunType::Normal => match kind {
            SessionKind::Batch => matches!(
                (from, to),
                (NeverRun, Initializing)
                    | (Initializing, Running)
                    | (Running, Paused)
                    | (Paused, Running)
                    | (Running, UsagePushing)
                    | (UsagePushing, PushCompleted)
                    | (PushCompleted, ConsumeCompleted)
                    | (PushCompleted, Completed)
                    | (ConsumeCompleted, Completed)
            ),
            SessionKind::Realtime => matches!(
                (from, to),
                (NeverRun, Initializing)
                    | (Initializing, Running)
                    | (Running, Paused)
                    | (Paused, Running)
                    | (Running, Completed)
                    | (Paused, Completed)
            ),
        },
    }
}

/// `allowed`, as an error naming the session and what would be allowed instead.
pub fn check_transition(
    session: i64,
    run_type: RunType,
    kind: SessionKind,
    from: Status,
    to: Status,
) -> Result<(), TransitionRefused> {
    if allowed(run_type, kind, from, to) {
        return Ok(());
    }
    let next: Vec<&str> = ALL_STATUSES
        .iter()
        .filter(|s| allowed(run_type, kind, from, **s))
        .map(|s| s.name())
        .collect();
    let hint = if from.is_final() {
        format!(": {from} is final")
    } else {
        format!(" (a {run_type} session in {from} can go to {})", next.join(", "))
    };
    Err(TransitionRefused {
        session,
        from,
        to,
        hint,
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use Status::*;

    fn path_is_allowed(run_type: RunType, kind: SessionKind, path: &[Status]) -> bool {
        path.windows(2).all(|w| allowed(run_type, kind, w[0], w[1]))
    }

    #[test]
    fn names_round_trip() {
        for status in ALL_STATUSES {
            assert_eq!(status.name().parse::<Status>().unwrap(), status);
        }
        assert_eq!("running".parse::<Status>().unwrap(), Running);
        assert!("DONE".parse::<Status>().is_err());
        assert_eq!("debug".parse::<RunType>().unwrap(), RunType::Debug);
        assert_eq!(
            "bogus".parse::<RunType>().unwrap_err().to_string(),
            "run_type \"bogus\" is not supported: use NORMAL or DEBUG"
        );
    }

    #[test]
    fn the_spec_paths_are_allowed() {
        let batch = SessionKind::Batch;
        assert!(path_is_allowed(
            RunType::Debug,
            batch,
            &[NeverRun, Testing, TestingPassed]
        ));
        assert!(path_is_allowed(
            RunType::Debug,
            batch,
            &[NeverRun, Testing, TestingFailed]
        ));
        assert!(path_is_allowed(
            RunType::Normal,
            batch,
            &[
                NeverRun,
                Initializing,
                Running,
                Paused,
                Running,
                UsagePushing,
                PushCompleted,
                ConsumeCompleted,
                Completed
            ]
        ));
        assert!(path_is_allowed(
            RunType::Normal,
            batch,
            &[NeverRun, Initializing, Running, UsagePushing, PushCompleted, Completed]
        ));
        let rt = SessionKind::Realtime;
        assert!(path_is_allowed(
            RunType::Normal,
            rt,
            &[NeverRun, Initializing, Running, Paused, Running, Completed]
        ));
        assert!(path_is_allowed(
            RunType::Normal,
            rt,
            &[NeverRun, Initializing, Running, Paused, Completed]
        ));
    }

    #[test]
    fn any_non_final_status_may_fail_or_be_canceled() {
        for run_type in [RunType::Normal, RunType::Debug] {
            for kind in [SessionKind::Batch, SessionKind::Realtime] {
                for from in ALL_STATUSES {
                    for to in [Failed, Canceled] {
                        let expected = !from.is_final() && from != NeverRun;
                        assert_eq!(allowed(run_type, kind, from, to), expected, "{run_type} {from} -> {to}");
                    }
                }
            }
        }
    }

    #[test]
    fn final_statuses_never_change() {
        for from in ALL_STATUSES.into_iter().filter(|s| s.is_final()) {
            for to in ALL_STATUSES {
                assert!(!allowed(RunType::Normal, SessionKind::Batch, from, to));
                assert!(!allowed(RunType::Debug, SessionKind::Batch, from, to));
            }
        }
    }

    #[test]
    fn exactly_the_listed_transitions_are_allowed() {
        // Counted over the whole 13 x 13 table, so an added edge is noticed.
        let count = |run_type, kind| {
            let mut n = 0;
            for from in ALL_STATUSES {
                for to in ALL_STATUSES {
                    n += allowed(run_type, kind, from, to) as usize;
                }
            }
            n
        };
        // Path edges, plus the 7 non-final statuses after NEVER_RUN x {FAILED, CANCELED}.
        assert_eq!(count(RunType::Normal, SessionKind::Batch), 9 + 7 * 2);
        assert_eq!(count(RunType::Normal, SessionKind::Realtime), 6 + 7 * 2);
        assert_eq!(count(RunType::Debug, SessionKind::Batch), 3 + 7 * 2);
    }

    #[test]
    fn refusals_name_the_session_and_the_way_forward() {
        let err = check_transition(7, RunType::Normal, SessionKind::Batch, Running, Completed).unwrap_err();
        assert_eq!(
            err.to_string(),
            "session 7 cannot go from RUNNING to COMPLETED (a NORMAL session in RUNNING can go to PAUSED, USAGE_PUSHING, FAILED, CANCELED)"
        );
        let err = check_transition(8, RunType::Normal, SessionKind::Batch, Completed, Running).unwrap_err();
        assert_eq!(
            err.to_string(),
            "session 8 cannot go from COMPLETED to RUNNING: COMPLETED is final"
        );
        assert!(check_transition(9, RunType::Debug, SessionKind::Batch, Testing, Running).is_err());
        assert!(check_transition(9, RunType::Normal, SessionKind::Batch, UsagePushing, Paused).is_err());
        assert!(check_transition(9, RunType::Normal, SessionKind::Realtime, Running, UsagePushing).is_err());
    }

    #[test]
    fn working_statuses_hold_the_stream() {
        let working: Vec<Status> = ALL_STATUSES.into_iter().filter(|s| s.is_working()).collect();
        assert_eq!(working, [Initializing, Running, Paused, UsagePushing]);
    }
}
