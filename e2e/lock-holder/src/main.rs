//! `lock-holder LOCK STATE`: takes an exclusive flock on LOCK, then every 50 ms
//! writes `held <n>` to STATE while a second, non-blocking attempt through another
//! open file is refused (the lock is still ours), or `lost <n>` when it is granted.
//! Built static into the e2e image, to show that a checkpoint keeps file locks.

use std::process::ExitCode;
use std::time::Duration;

use nix::fcntl::{Flock, FlockArg};

fn main() -> ExitCode {
    let args: Vec<String> = std::env::args().collect();
    let (Some(lock), Some(state)) = (args.get(1), args.get(2)) else {
        eprintln!("usage: lock-holder LOCK STATE");
        return ExitCode::FAILURE;
    };
    let open = || {
        std::fs::OpenOptions::new()
            .create(true)
            .truncate(false)
            .write(true)
            .open(lock)
    };
    let held = match open().map(|f| Flock::lock(f, FlockArg::LockExclusive)) {
        Ok(Ok(held)) => held,
        Ok(Err((_, e))) => {
            eprintln!("lock-holder: cannot lock {lock}: {e}");
            return ExitCode::FAILURE;
        }
        Err(e) => {
            eprintln!("lock-holder: cannot open {lock}: {e}");
            return ExitCode::FAILURE;
        }
    };
    let mut n: u64 = 0;
    loop {
        n += 1;
        let word = match open().map(|f| Flock::lock(f, FlockArg::LockExclusiveNonblock)) {
            // Granted to the second file: ours is gone.
            Ok(Ok(_second)) => "lost",
            _ => "held",
        };
        let tmp = format!("{state}.tmp");
        if std::fs::write(&tmp, format!("{word} {n}\n")).is_ok() {
            let _ = std::fs::rename(&tmp, state);
        }
        std::thread::sleep(Duration::from_millis(50));
        // Keep the lock's file open for the life of the process.
        let _ = &held;
    }
}
