// PATCH (outline-mcp-proxy): the chunked body reader, in place of chunked_transfer's
// Decoder. Upstream's grew a chunk-size line without bound, took "+5" and " 5" for a
// size, read a body cut short by EOF as complete, and left the connection's next
// request to start wherever the handler stopped reading. This one:
// - reads `chunk-size [; ext] CRLF` strictly (hex digits only, the line at most
//   MAX_CHUNK_LINE bytes), each chunk's CRLF, and the trailer section (bounded too);
// - says when the body was read to its end (`done`), so the head writer can tell;
// - when dropped before its end, ends keep-alive (`closing`): what is left of the body
//   is never read as the next request. (EqualReader does the same.)
use std::io::{Error as IoError, ErrorKind, Read, Result as IoResult};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;

/// The longest chunk-size line (with its extensions) or trailer line accepted.
pub const MAX_CHUNK_LINE: usize = 4 * 1024;
/// The most bytes of trailer fields accepted after the last chunk.
const MAX_TRAILERS: usize = 8 * 1024;

enum State {
    /// Before a chunk-size line.
    Size,
    /// Inside a chunk: this many bytes of data left.
    Data(u64),
    /// After a chunk's data: its CRLF.
    DataEnd,
    /// After the last chunk: the trailer section, up to its blank line.
    Trailers,
    /// The whole body was read.
    Done,
    /// A framing error: nothing more is read (the connection is closed).
    Broken,
}

pub struct ChunkedReader<R: Read> {
    source: R,
    state: State,
    done: Arc<AtomicBool>,
    closing: Option<Arc<AtomicBool>>,
}

impl<R: Read> ChunkedReader<R> {
    /// `done` is raised once the last chunk and the trailers are read; `closing` (the
    /// connection's "read no further request") is raised if the reader is dropped first.
    pub fn new(source: R, done: Arc<AtomicBool>, closing: Option<Arc<AtomicBool>>) -> Self {
        ChunkedReader { source, state: State::Size, done, closing }
    }

    fn read_byte(&mut self) -> IoResult<u8> {
        let mut byte = [0u8; 1];
        loop {
            match self.source.read(&mut byte) {
                Ok(0) => return Err(IoError::new(ErrorKind::UnexpectedEof, "the chunked body ended early")),
                Ok(_) => return Ok(byte[0]),
                Err(e) if e.kind() == ErrorKind::Interrupted => continue,
                Err(e) => return Err(e),
            }
        }
    }

    /// One line ended by CRLF (a bare LF is refused), without the CRLF; at most `max` bytes.
    fn read_line(&mut self, max: usize) -> IoResult<Vec<u8>> {
        let mut line = Vec::new();
        loop {
            let byte = self.read_byte()?;
            if byte == b'\n' {
                if line.pop() != Some(b'\r') {
                    return Err(invalid("a chunked body's line must end with CRLF"));
                }
                return Ok(line);
            }
            line.push(byte);
            if line.len() > max + 1 {
                return Err(invalid("a chunked body's line is too long"));
            }
        }
    }

    /// The next thing the body holds, until data or its end.
    fn advance(&mut self) -> IoResult<()> {
        match self.state {
            State::Size => {
                let line = self.read_line(MAX_CHUNK_LINE)?;
                let size = parse_chunk_size(&line)?;
                self.state = if size == 0 { State::Trailers } else { State::Data(size) };
            }
            State::DataEnd => {
                if !self.read_line(0)?.is_empty() {
                    return Err(invalid("a chunk's data is longer than its size"));
                }
                self.state = State::Size;
            }
            State::Trailers => {
                let mut total = 0;
                loop {
                    let line = self.read_line(MAX_CHUNK_LINE)?;
                    if line.is_empty() {
                        break;
                    }
                    total += line.len() + 2;
                    if total > MAX_TRAILERS {
                        return Err(invalid("the chunked body's trailers are too large"));
                    }
                }
                self.state = State::Done;
                self.done.store(true, Ordering::SeqCst);
            }
            State::Data(_) | State::Done | State::Broken => {}
        }
        Ok(())
    }
}

fn invalid(why: &'static str) -> IoError {
    IoError::new(ErrorKind::InvalidData, why)
}

/// `1*HEXDIG [ BWS ";" ext ]`: nothing else before the extensions, at most 16 digits.
fn parse_chunk_size(line: &[u8]) -> IoResult<u64> {
    let digits = line.iter().take_while(|b| b.is_ascii_hexdigit()).count();
    if digits == 0 || digits > 16 {
        return Err(invalid("a chunk size is not a hexadecimal number"));
    }
    let rest = &line[digits..];
    let after_space: &[u8] = {
        let spaces = rest.iter().take_while(|b| **b == b' ' || **b == b'\t').count();
        &rest[spaces..]
    };
    if !(rest.is_empty() || after_space.first() == Some(&b';')) {
        return Err(invalid("a chunk size is not a hexadecimal number"));
    }
    let text = std::str::from_utf8(&line[..digits]).map_err(|_| invalid("a chunk size is not ASCII"))?;
    u64::from_str_radix(text, 16).map_err(|_| invalid("a chunk size is too large"))
}

impl<R: Read> Read for ChunkedReader<R> {
    fn read(&mut self, buf: &mut [u8]) -> IoResult<usize> {
        if buf.is_empty() {
            return Ok(0);
        }
        loop {
            match self.state {
                State::Done => return Ok(0),
                State::Broken => return Err(invalid("the chunked body is not valid")),
                State::Data(left) => {
                    let want: usize = buf.len().min(std::convert::TryFrom::try_from(left).unwrap_or(usize::MAX));
                    let n = match self.source.read(&mut buf[..want]) {
                        Ok(0) => {
                            self.state = State::Broken;
                            return Err(IoError::new(ErrorKind::UnexpectedEof, "the chunked body ended early"));
                        }
                        Ok(n) => n,
                        Err(e) => return Err(e),
                    };
                    let left = left - n as u64;
                    self.state = if left == 0 { State::DataEnd } else { State::Data(left) };
                    return Ok(n);
                }
                State::Size | State::DataEnd | State::Trailers => {
                    if let Err(e) = self.advance() {
                        // a line half read cannot be resumed (not after a timeout either)
                        self.state = State::Broken;
                        return Err(e);
                    }
                }
            }
        }
    }
}

impl<R: Read> Drop for ChunkedReader<R> {
    fn drop(&mut self) {
        if !matches!(self.state, State::Done) {
            if let Some(closing) = &self.closing {
                closing.store(true, Ordering::SeqCst);
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::ChunkedReader;
    use std::io::Read;
    use std::sync::atomic::{AtomicBool, Ordering};
    use std::sync::Arc;

    fn read_all(wire: &[u8]) -> (std::io::Result<Vec<u8>>, bool, bool) {
        let done = Arc::new(AtomicBool::new(false));
        let closing = Arc::new(AtomicBool::new(false));
        let mut body = Vec::new();
        let result = {
            let mut reader = ChunkedReader::new(wire, done.clone(), Some(closing.clone()));
            reader.read_to_end(&mut body).map(|_| body)
        };
        (result, done.load(Ordering::SeqCst), closing.load(Ordering::SeqCst))
    }

    #[test]
    fn reads_a_body_to_its_end() {
        let (body, done, closing) = read_all(b"3\r\nhel\r\nB;x=y\r\nlo world!!!\r\n0\r\nX-T: 1\r\n\r\nGET / HTTP/1.1");
        assert_eq!(body.unwrap(), b"hello world!!!");
        assert!(done && !closing);
    }

    #[test]
    fn refuses_what_could_be_read_two_ways() {
        for wire in [
            &b"+3\r\nhel\r\n0\r\n\r\n"[..],
            b" 3\r\nhel\r\n0\r\n\r\n",
            b"3\nhel\r\n0\r\n\r\n",
            b"3\r\nhell\r\n0\r\n\r\n",
            b"0x3\r\nhel\r\n0\r\n\r\n",
            b"11111111111111111\r\n",
            b"3\r\nhe",
        ] {
            let (body, done, closing) = read_all(wire);
            assert!(body.is_err(), "{:?}", String::from_utf8_lossy(wire));
            assert!(!done && closing);
        }
    }

    #[test]
    fn a_long_size_line_is_cut() {
        let mut wire = b"1;".to_vec();
        wire.extend(std::iter::repeat(b'a').take(super::MAX_CHUNK_LINE + 10));
        wire.extend_from_slice(b"\r\nx\r\n0\r\n\r\n");
        let (body, _, closing) = read_all(&wire);
        assert!(body.is_err() && closing);
    }

    #[test]
    fn dropped_early_ends_keep_alive() {
        let done = Arc::new(AtomicBool::new(false));
        let closing = Arc::new(AtomicBool::new(false));
        {
            let mut reader = ChunkedReader::new(&b"5\r\nhello\r\n0\r\n\r\n"[..], done.clone(), Some(closing.clone()));
            let mut two = [0u8; 2];
            reader.read_exact(&mut two).unwrap();
        }
        assert!(!done.load(Ordering::SeqCst) && closing.load(Ordering::SeqCst));
    }
}
