pub mod enroll;
pub mod restore;
pub mod snapshots;
pub mod sync;
