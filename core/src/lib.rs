//! What the Morgana agent and appliance share: content ids, chunking, the tree and pack
//! formats, and the wire types. No I/O policy, no HTTP, no database: both sides build on
//! these pure pieces, and `FORMAT.md` beside this crate documents every byte.

pub mod chunker;
pub mod control;
pub mod dpkg;
pub mod duration;
pub mod id;
pub mod image;
pub mod memory;
pub mod pack;
pub mod plugin;
pub mod policy;
pub mod testdata;
pub mod tree;
pub mod varint;
pub mod wire;

pub use chunker::{Chunker, ChunkerParams};
pub use id::Id;
