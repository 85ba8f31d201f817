//! The reference evaluator (being written).
