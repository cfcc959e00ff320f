//! The source's numeric identifiers. Each is a positive integer over the full
//! `u64` range; zero, negatives, fractions and numbers written as strings are
//! refused where they enter (a trail completion; another slug's ids are read
//! leniently, digit strings included, and left out when unreadable).

use std::fmt;
use std::num::NonZeroU64;

use serde::{Deserialize, Serialize};

/// Why a JSON value is not an id.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum IdError {
    #[error("must be a positive integer, got zero")]
    Zero,
    #[error("must be a positive integer, got a negative number")]
    Negative,
    #[error("must be a positive integer no larger than 18446744073709551615, got {0}")]
    NotAnInteger(String),
    #[error("must be a positive integer, got {0}")]
    WrongType(&'static str),
}

macro_rules! id_type {
    ($(#[$doc:meta])* $name:ident) => {
        $(#[$doc])*
        #[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
        #[serde(try_from = "u64", into = "u64")]
        pub struct $name(NonZeroU64);

        impl $name {
            /// Builds the id from a JSON value, naming what was wrong.
            pub fn parse(value: &serde_json::Value) -> Result<Self, IdError> {
                parse_positive(value).map(Self)
            }

            pub fn get(self) -> u64 {
                self.0.get()
            }
        }

        impl TryFrom<u64> for $name {
            type Error = IdError;
            fn try_from(value: u64) -> Result<Self, IdError> {
                NonZeroU64::new(value).map(Self).ok_or(IdError::Zero)
            }
        }

        impl From<$name> for u64 {
            fn from(id: $name) -> u64 {
                id.get()
            }
        }

        impl fmt::Display for $name {
            fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
                self.0.fmt(f)
            }
        }
    };
}

id_type!(
    /// An institution (a customer of the learning platform).
    InstitutionId
);
id_type!(
    /// A learner, unique within the source.
    UserId
);
id_type!(
    /// A learning trail.
    TrailId
);
id_type!(
    /// A course inside a trail.
    CourseId
);

fn parse_positive(value: &serde_json::Value) -> Result<NonZeroU64, IdError> {
    use serde_json::Value;
    match value {
        Value::Number(n) => {
            if let Some(u) = n.as_u64() {
                NonZeroU64::new(u).ok_or(IdError::Zero)
            } else if n.as_i64().is_some() {
                Err(IdError::Negative)
            } else {
                Err(IdError::NotAnInteger(n.to_string()))
            }
        }
        Value::String(_) => Err(IdError::WrongType("a string")),
        Value::Null => Err(IdError::WrongType("null")),
        Value::Bool(_) => Err(IdError::WrongType("a boolean")),
        Value::Array(_) => Err(IdError::WrongType("an array")),
        Value::Object(_) => Err(IdError::WrongType("an object")),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    #[test]
    fn accepts_the_full_u64_range() {
        assert_eq!(UserId::parse(&json!(1)).map(UserId::get), Ok(1));
        assert_eq!(
            UserId::parse(&json!(u64::MAX)).map(UserId::get),
            Ok(u64::MAX)
        );
    }

    #[test]
    fn refuses_what_is_not_a_positive_integer() {
        assert_eq!(UserId::parse(&json!(0)), Err(IdError::Zero));
        assert_eq!(UserId::parse(&json!(-5)), Err(IdError::Negative));
        assert!(matches!(
            UserId::parse(&json!(1.5)),
            Err(IdError::NotAnInteger(_))
        ));
        assert_eq!(
            UserId::parse(&json!("12")),
            Err(IdError::WrongType("a string"))
        );
        assert_eq!(UserId::parse(&json!(null)), Err(IdError::WrongType("null")));
        // Larger than u64::MAX: serde_json reads it as a float.
        let big: serde_json::Value =
            serde_json::from_str("18446744073709551616").unwrap_or_default();
        assert!(matches!(UserId::parse(&big), Err(IdError::NotAnInteger(_))));
    }

    #[test]
    fn serde_refuses_zero() {
        assert!(serde_json::from_str::<TrailId>("0").is_err());
        assert_eq!(
            serde_json::from_str::<TrailId>("7").map(TrailId::get).ok(),
            Some(7)
        );
    }
}
