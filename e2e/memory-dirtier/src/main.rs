//! `memory-dirtier MIB`: allocates MIB MiB of anonymous memory, writes every page (half
//! of each page pseudo-random, half a repeated pattern, so compression has something
//! but not everything to gain), says `filled MIB MiB`, then keeps writing one page in
//! turn every 10 ms so the memory stays dirty and the process visibly alive.

use std::io::Write;
use std::time::Duration;

const PAGE: usize = 4096;

fn main() -> std::process::ExitCode {
    let Some(mib) = std::env::args().nth(1).and_then(|a| a.parse::<usize>().ok()) else {
        eprintln!("usage: memory-dirtier MIB");
        return std::process::ExitCode::from(2);
    };
    let mut memory = vec![0u8; mib << 20];
    let mut state = 0x9E37_79B9_7F4A_7C15_u64 ^ u64::from(std::process::id());
    for page in memory.chunks_mut(PAGE) {
        let (random, pattern) = page.split_at_mut(PAGE / 2);
        for word in random.chunks_mut(8) {
            // xorshift64: cheap, and incompressible enough.
            state ^= state << 13;
            state ^= state >> 7;
            state ^= state << 17;
            word.copy_from_slice(&state.to_le_bytes()[..word.len()]);
        }
        for (i, b) in pattern.iter_mut().enumerate() {
            *b = b"cryopod "[i % 8];
        }
    }
    let mut out = std::io::stdout();
    let _ = writeln!(out, "filled {mib} MiB");
    let _ = out.flush();
    let pages = memory.len() / PAGE;
    let mut turn = 0usize;
    loop {
        if pages > 0 {
            let at = (turn % pages) * PAGE;
            memory[at] = memory[at].wrapping_add(1);
        }
        turn = turn.wrapping_add(1);
        std::thread::sleep(Duration::from_millis(10));
    }
}
