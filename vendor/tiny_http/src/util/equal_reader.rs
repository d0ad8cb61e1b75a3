use std::io::Read;
use std::io::Result as IoResult;
use std::sync::mpsc::channel;
use std::sync::mpsc::{Receiver, Sender};

/// A `Reader` that reads exactly the number of bytes from a sub-reader.
///
/// If the limit is reached, it returns EOF. If the limit is not reached
/// when the destructor is called, the remaining bytes will be read and
/// thrown away.
pub struct EqualReader<R>
where
    R: Read,
{
    reader: R,
    size: usize,
    last_read_signal: Sender<IoResult<()>>,
    // PATCH (outline-mcp-proxy): on a connection, (done, closing): `done` is raised once
    // the body is read to its end; dropped before it, the reader raises the connection's
    // `closing` instead of draining (an answer given before the body, e.g. a 413 for a
    // declared 10^13 bytes, goes out at once and the connection is closed unread)
    connection: Option<(std::sync::Arc<std::sync::atomic::AtomicBool>, std::sync::Arc<std::sync::atomic::AtomicBool>)>,
}

impl<R> EqualReader<R>
where
    R: Read,
{
    pub fn new(reader: R, size: usize) -> (EqualReader<R>, Receiver<IoResult<()>>) {
        let (tx, rx) = channel();

        let r = EqualReader {
            reader,
            size,
            last_read_signal: tx,
            connection: None, // PATCH (outline-mcp-proxy)
        };

        (r, rx)
    }

    /// PATCH (outline-mcp-proxy): raise `done` at the body's end; dropped before it,
    /// raise `closing` (no further request is read) rather than drain.
    pub fn on_connection(
        mut self,
        done: std::sync::Arc<std::sync::atomic::AtomicBool>,
        closing: std::sync::Arc<std::sync::atomic::AtomicBool>,
    ) -> Self {
        if self.size == 0 {
            done.store(true, std::sync::atomic::Ordering::SeqCst);
        }
        self.connection = Some((done, closing));
        self
    }
}

impl<R> Read for EqualReader<R>
where
    R: Read,
{
    fn read(&mut self, buf: &mut [u8]) -> IoResult<usize> {
        if self.size == 0 {
            return Ok(0);
        }

        let buf = if buf.len() < self.size {
            buf
        } else {
            &mut buf[..self.size]
        };

        match self.reader.read(buf) {
            Ok(len) => {
                self.size -= len;
                // PATCH (outline-mcp-proxy): the body's end is noted
                if self.size == 0 {
                    if let Some((done, _)) = &self.connection {
                        done.store(true, std::sync::atomic::Ordering::SeqCst);
                    }
                }
                Ok(len)
            }
            err @ Err(_) => err,
        }
    }
}

impl<R> Drop for EqualReader<R>
where
    R: Read,
{
    fn drop(&mut self) {
        let mut remaining_to_read = self.size;
        // PATCH (outline-mcp-proxy): on a connection, an unread rest is not drained: the
        // connection is closed after the answer (the head writer says so too)
        if let Some((_, closing)) = &self.connection {
            if remaining_to_read > 0 {
                closing.store(true, std::sync::atomic::Ordering::SeqCst);
            }
            remaining_to_read = 0;
        }

        // PATCH (outline-mcp-proxy): upstream allocated the whole unread remainder
        // at once (a Content-Length of 10^13 aborted the process); drain in chunks.
        let mut buf = vec![0; 8 * 1024];
        while remaining_to_read > 0 {
            let want = remaining_to_read.min(buf.len());
            let buf = &mut buf[..want];

            match self.reader.read(buf) {
                Err(e) => {
                    self.last_read_signal.send(Err(e)).ok();
                    break;
                }
                Ok(0) => {
                    self.last_read_signal.send(Ok(())).ok();
                    break;
                }
                Ok(other) => {
                    remaining_to_read -= other;
                }
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::EqualReader;
    use std::io::Read;

    #[test]
    fn test_limit() {
        use std::io::Cursor;

        let mut org_reader = Cursor::new("hello world".to_string().into_bytes());

        {
            let (mut equal_reader, _) = EqualReader::new(org_reader.by_ref(), 5);

            let mut string = String::new();
            equal_reader.read_to_string(&mut string).unwrap();
            assert_eq!(string, "hello");
        }

        let mut string = String::new();
        org_reader.read_to_string(&mut string).unwrap();
        assert_eq!(string, " world");
    }

    #[test]
    fn test_not_enough() {
        use std::io::Cursor;

        let mut org_reader = Cursor::new("hello world".to_string().into_bytes());

        {
            let (mut equal_reader, _) = EqualReader::new(org_reader.by_ref(), 5);

            let mut vec = [0];
            equal_reader.read_exact(&mut vec).unwrap();
            assert_eq!(vec[0], b'h');
        }

        let mut string = String::new();
        org_reader.read_to_string(&mut string).unwrap();
        assert_eq!(string, " world");
    }
}
