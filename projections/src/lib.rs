//! Projection workers and read models. Filled in by the projections work;
//! for now this crate only fixes its place in the dependency graph
//! (`domain` and `store` are leaves, `projections` depends on both).
#![forbid(unsafe_code)]
