//! The sinks' error model: every failure a backend reports is a [`SinkError`] of one
//! [`SinkErrorKind`], classified in one place per backend (`classify` in `mysql.rs` and
//! `sqlite.rs`), and the kind alone decides what happens:
//!
//! | kind | what happens |
//! |---|---|
//! | [`SinkErrorKind::Transient`] | the runner retries the batch with backoff, forever |
//! | [`SinkErrorKind::RowRefused`] | inside a row-isolating statement: the row is dead-lettered, the rest commits; anywhere else it counts as fatal |
//! | [`SinkErrorKind::Fatal`] | the service stops with the error's line |
//!
//! [`SchemaProblem`] is what preparing a backend finds wrong with a mapped table: typed, so
//! that `check` can tell a table `create_table` will create from one that is missing.

use std::fmt::Display;
use std::sync::Arc;

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum SinkErrorKind {
    /// Retry later: connection lost, server restarting, deadlock, lock wait timeout, read-only
    /// during a failover.
    Transient,
    /// The database refused one row (conversion, length, NOT NULL, constraint).
    RowRefused,
    /// Retrying cannot help.
    Fatal,
}

/// A failure of a sink, with the driver's error as its source.
#[derive(Debug, Clone, thiserror::Error)]
#[error("{message}")]
pub struct SinkError {
    kind: SinkErrorKind,
    message: String,
    #[source]
    source: Option<Arc<dyn std::error::Error + Send + Sync>>,
}

impl SinkError {
    pub fn new(kind: SinkErrorKind, message: impl Into<String>) -> SinkError {
        SinkError {
            kind,
            message: message.into(),
            source: None,
        }
    }

    pub fn transient(message: impl Into<String>) -> SinkError {
        SinkError::new(SinkErrorKind::Transient, message)
    }

    pub fn fatal(message: impl Into<String>) -> SinkError {
        SinkError::new(SinkErrorKind::Fatal, message)
    }

    /// Keeps `source` as the cause.
    pub fn caused_by(mut self, source: impl std::error::Error + Send + Sync + 'static) -> Self {
        self.source = Some(Arc::new(source));
        self
    }

    /// Prefixes the message with where it happened (`backend `db``, a table, ...).
    pub fn context(mut self, place: impl Display) -> Self {
        self.message = format!("{place}: {}", self.message);
        self
    }

    pub fn kind(&self) -> SinkErrorKind {
        self.kind
    }

    pub fn is_transient(&self) -> bool {
        self.kind == SinkErrorKind::Transient
    }

    /// Outside a row-isolating statement a refused row cannot be set aside: it stops the batch
    /// like any fatal error.
    pub fn outside_row(mut self) -> Self {
        if self.kind == SinkErrorKind::RowRefused {
            self.kind = SinkErrorKind::Fatal;
        }
        self
    }

    /// The message alone (for a refused row: the reason stored with its dead letter).
    pub fn reason(&self) -> &str {
        &self.message
    }
}

/// Something wrong with a backend or a mapped table, found before any row is written.
#[derive(Debug, Clone, thiserror::Error)]
pub enum SchemaProblem {
    /// The backend cannot be used at all (unreachable, no checkpoint table, ...).
    #[error(transparent)]
    Backend(#[from] SinkError),
    #[error("mapping `{mapping}`: table `{table}` does not exist in {place}; create it or set create_table = true")]
    MissingTable {
        mapping: String,
        table: String,
        /// The backend, as its messages name it.
        place: String,
    },
    #[error("mapping `{mapping}`: cannot create table `{table}`: {message}")]
    CannotCreate {
        mapping: String,
        table: String,
        message: String,
    },
    #[error("mapping `{mapping}`: cannot read the columns of `{table}`: {message}")]
    Unreadable {
        mapping: String,
        table: String,
        message: String,
    },
    #[error("mapping `{mapping}`: key column `{column}` of table `{table}` is neither the primary key nor unique; add a unique index on it")]
    KeyNotUnique {
        mapping: String,
        table: String,
        column: String,
    },
    #[error("mapping `{mapping}`: table `{table}` has no key column `{column}`")]
    MissingKeyColumn {
        mapping: String,
        table: String,
        column: String,
    },
    #[error("mapping `{mapping}`: table `{table}` has no column `{column}`")]
    MissingColumn {
        mapping: String,
        table: String,
        column: String,
    },
    #[error("mapping `{mapping}`: the database user may not {privilege} on `{table}`: {message}")]
    MissingGrant {
        mapping: String,
        table: String,
        privilege: String,
        message: String,
    },
}

impl SchemaProblem {
    /// The mapping whose table is missing, when that is the problem.
    pub fn missing_table_of(&self) -> Option<&str> {
        match self {
            SchemaProblem::MissingTable { mapping, .. } => Some(mapping),
            _ => None,
        }
    }
}
