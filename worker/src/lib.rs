pub mod import;
pub mod validate;
