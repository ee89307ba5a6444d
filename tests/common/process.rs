//! A `stowage` child process that cannot outlive its test: dropped (a test that
//! panicked) it is killed; `stop` is the clean way out (SIGTERM, exit status 0).

use std::process::Child;

use nix::sys::signal::{Signal, kill};
use nix::unistd::Pid;

pub struct Process(pub Child);

impl Process {
    /// SIGTERM, then wait: the process must exit 0.
    pub fn stop(mut self) {
        kill(Pid::from_raw(self.0.id() as i32), Signal::SIGTERM).unwrap();
        let status = self.0.wait().unwrap();
        assert!(status.success(), "{status}");
    }
}

impl Drop for Process {
    fn drop(&mut self) {
        if matches!(self.0.try_wait(), Ok(None)) {
            let _ = self.0.kill();
            let _ = self.0.wait();
        }
    }
}
