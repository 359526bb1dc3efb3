//! The test kit, under the name the test files use (`mod support;`): see
//! the `rampart-testkit` crate (`testkit/`).

pub use rampart_testkit::*;
