//! Aggregations (SPEC §5): how a meter folds usage values into its value.

use std::fmt;
use std::str::FromStr;

#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Aggregation {
    Sum,
    Increment,
    Min,
    Max,
    Latest,
    UniqueCount,
}

pub const AGGREGATION_NAMES: &str = "sum, increment, min, max, latest, unique_count";

impl Aggregation {
    pub fn name(self) -> &'static str {
        match self {
            Aggregation::Sum => "sum",
            Aggregation::Increment => "increment",
            Aggregation::Min => "min",
            Aggregation::Max => "max",
            Aggregation::Latest => "latest",
            Aggregation::UniqueCount => "unique_count",
        }
    }

    /// Whether a meter's value is 0 at the start of a period (otherwise null:
    /// min, max and latest have no value until a record arrives).
    pub fn resets_to_zero(self) -> bool {
        matches!(
            self,
            Aggregation::Sum | Aggregation::Increment | Aggregation::UniqueCount
        )
    }

    /// Whether records must carry a value (`increment` counts records instead).
    pub fn needs_value(self) -> bool {
        !matches!(self, Aggregation::Increment)
    }
}

impl fmt::Display for Aggregation {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.name())
    }
}

#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("aggregation \"{0}\" is not supported: use one of {AGGREGATION_NAMES}")]
pub struct UnknownAggregation(pub String);

impl FromStr for Aggregation {
    type Err = UnknownAggregation;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        Ok(match s.trim().to_ascii_lowercase().as_str() {
            "sum" => Aggregation::Sum,
            "increment" => Aggregation::Increment,
            "min" => Aggregation::Min,
            "max" => Aggregation::Max,
            "latest" => Aggregation::Latest,
            "unique_count" => Aggregation::UniqueCount,
            _ => return Err(UnknownAggregation(s.to_string())),
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn names_round_trip() {
        for name in AGGREGATION_NAMES.split(", ") {
            assert_eq!(name.parse::<Aggregation>().unwrap().name(), name);
        }
        assert_eq!("SUM".parse::<Aggregation>().unwrap(), Aggregation::Sum);
        assert_eq!(
            "avg".parse::<Aggregation>().unwrap_err().to_string(),
            "aggregation \"avg\" is not supported: use one of sum, increment, min, max, latest, unique_count"
        );
    }
}
