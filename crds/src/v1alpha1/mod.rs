//! `cryopod.io/v1alpha1`.

mod checkpoint;
mod evacuation;
mod migration;
mod restore;
mod schedule;
mod storage;

pub use checkpoint::*;
pub use evacuation::*;
pub use migration::*;
pub use restore::*;
pub use schedule::*;
pub use storage::*;
