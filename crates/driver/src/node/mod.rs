//! Node-side OS work: mounting, bind-mounting, unmounting, mount-table lookups, block
//! devices (lookup by serial, format, grow), filesystem statistics, and keeping node
//! paths under kubelet's directory. Owns every `mount`/`umount` the plugin runs, behind
//! the [`Mounter`] trait so handlers can be tested against a recording fake where the
//! kernel can't do the real thing (NFS here). Knows nothing about CSI or backends.

pub mod confine;
pub mod device;
pub mod format;
mod mounter;
mod stats;

pub use mounter::{MountError, Mounter, SystemMounter, mount_args, mount_entry, mount_points};
pub use stats::{TreeWalks, usage, usage_within};
