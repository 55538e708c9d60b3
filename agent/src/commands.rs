pub mod enroll;
pub mod inventory;
pub mod reflectors;
pub mod restore;
pub mod run;
pub mod snapshots;
pub mod sync;
