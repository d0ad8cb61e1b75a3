// PATCH (outline-mcp-proxy): the one lingering close, as nginx's lingering_close: a
// connection closed while the client may still be sending (a body left unread, an
// error found in its head) is half-closed after the answer, what still comes is read
// and thrown away for a bounded time and number of bytes, and only then closed.
// Closing at once with unread bytes in the socket makes the kernel send a reset,
// which can destroy the answer before the client has read it.
use std::io::Read;
use std::net::{Shutdown, TcpStream};
use std::time::{Duration, Instant};

/// How long and how much a closing connection is read and thrown away.
#[derive(Clone, Copy, Debug)]
pub struct Linger {
    /// The longest in all (nginx: lingering_time).
    pub time: Duration,
    /// A client silent this long is closed on (nginx: lingering_timeout).
    pub idle: Duration,
    /// The most bytes thrown away.
    pub bytes: usize,
}

impl Linger {
    /// After an answer on a connection's own thread: a refused body of some megabytes
    /// on a slow link still arrives whole, and the client reads its answer.
    pub const AFTER_ANSWER: Linger =
        Linger { time: Duration::from_secs(5), idle: Duration::from_secs(1), bytes: 16 * 1024 * 1024 };
    /// On the one thread that refuses connections over the cap: short, so one client
    /// cannot hold the others' refusals up.
    pub const REFUSAL: Linger =
        Linger { time: Duration::from_millis(250), idle: Duration::from_millis(250), bytes: 64 * 1024 };
}

/// Half-closes `socket` (the answer written before stays sendable), then reads and
/// discards until the client closes, goes quiet for `idle`, or `time` or `bytes` is
/// reached. The caller closes the socket afterwards (by dropping it).
pub fn lingering_close(socket: &TcpStream, limits: Linger) {
    let _ = socket.shutdown(Shutdown::Write);
    let deadline = Instant::now() + limits.time;
    let mut discard = vec![0u8; 16 * 1024];
    let mut discarded = 0usize;
    while discarded < limits.bytes {
        let left = deadline.saturating_duration_since(Instant::now());
        if left.is_zero() || socket.set_read_timeout(Some(left.min(limits.idle))).is_err() {
            break;
        }
        match (&*socket).read(&mut discard) {
            Ok(0) => break,
            Ok(n) => discarded += n,
            Err(e) if e.kind() == std::io::ErrorKind::Interrupted => {}
            Err(_) => break,
        }
    }
}
