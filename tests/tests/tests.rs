//! One integration-test binary (one link) with a module per subject.

mod file_level;
mod pipeline;
mod redelivery;
mod upload;
