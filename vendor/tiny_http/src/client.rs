use ascii::AsciiString;

use std::io::Error as IoError;
use std::io::Result as IoResult;
use std::io::{BufReader, BufWriter, ErrorKind, Read};

use std::net::{SocketAddr, TcpStream}; // PATCH: the socket handle
use std::str::FromStr;

use crate::common::{HTTPVersion, Method};
use crate::util::RefinedTcpStream;
use crate::util::{SequentialReader, SequentialReaderBuilder, SequentialWriterBuilder};
use crate::Request;

/// A ClientConnection is an object that will store a socket to a client
/// and return Request objects.
pub struct ClientConnection {
    // address of the client
    remote_addr: IoResult<Option<SocketAddr>>,

    // sequence of Readers to the stream, so that the data is not read in
    //  the wrong order
    source: SequentialReaderBuilder<BufReader<RefinedTcpStream>>,

    // sequence of Writers to the stream, to avoid writing response #2 before
    //  response #1
    sink: SequentialWriterBuilder<BufWriter<RefinedTcpStream>>,

    // Reader to read the next header from
    next_header_source: SequentialReader<BufReader<RefinedTcpStream>>,

    // set to true if we know that the previous request is the last one
    no_more_requests: bool,

    // true if the connection goes through SSL
    secure: bool,

    // PATCH: a second handle on the TCP socket, given to each request
    control: Option<std::sync::Arc<TcpStream>>,

    // PATCH: how errors found while reading a request are worded (the embedder's format)
    error_page: Option<crate::ErrorPage>,

    // PATCH: raised by a request's handler (`Request::close_connection`): no further
    // request is read from this connection, whatever is still buffered
    closing: std::sync::Arc<std::sync::atomic::AtomicBool>,

    // PATCH: the connection ends while the client may still be sending (an error in its
    // head, a body left unread): `end` closes it lingering
    linger: bool,
}

/// PATCH (outline-mcp-proxy): the longest request line or header line accepted.
const MAX_LINE: usize = 8 * 1024;
/// PATCH (outline-mcp-proxy): the most header lines accepted in one request.
const MAX_HEADERS: usize = 100;

/// Error that can happen when reading a request.
#[derive(Debug)]
enum ReadError {
    WrongRequestLine,
    WrongHeader(HTTPVersion),
    /// PATCH: a line over MAX_LINE bytes or more than MAX_HEADERS headers
    HeadersTooLarge,
    /// PATCH: the read timed out before the first byte of a request
    IdleTimeout,
    /// PATCH: Content-Length / Transfer-Encoding that could be read two ways
    AmbiguousFraming(HTTPVersion, &'static str),
    /// the client sent an unrecognized `Expect` header
    ExpectationFailed(HTTPVersion),
    ReadIoError(IoError),
}

impl ClientConnection {
    /// Creates a new `ClientConnection` that takes ownership of the `TcpStream`.
    pub fn new(
        write_socket: RefinedTcpStream,
        mut read_socket: RefinedTcpStream,
        // PATCH: the socket handle and the embedder's error page
        control: Option<TcpStream>,
        error_page: Option<crate::ErrorPage>,
    ) -> ClientConnection {
        // one shared handle for every request of the connection (no dup per request)
        let control = control.map(std::sync::Arc::new);
        let remote_addr = read_socket.peer_addr();
        let secure = read_socket.secure();

        let mut source = SequentialReaderBuilder::new(BufReader::with_capacity(1024, read_socket));
        let first_header = source.next().unwrap();

        ClientConnection {
            source,
            sink: SequentialWriterBuilder::new(BufWriter::with_capacity(1024, write_socket)),
            remote_addr,
            next_header_source: first_header,
            no_more_requests: false,
            secure,
            // PATCH: the socket handle, the close flag, the error page
            control,
            closing: Default::default(),
            error_page,
            linger: false,
        }
    }

    /// PATCH (outline-mcp-proxy): after the last request: what is still buffered is sent,
    /// and a connection ended with the client maybe still sending is closed lingering
    /// (`util::lingering_close`), so the client reads the answer rather than a reset.
    pub fn end(mut self) {
        if let Some(mut writer) = self.sink.next() {
            let _ = std::io::Write::flush(&mut writer);
        }
        if self.linger {
            if let Some(socket) = self.control.as_ref() {
                crate::util::lingering_close(socket, crate::util::Linger::AFTER_ANSWER);
            }
        }
    }

    /// true if the connection is HTTPS
    pub fn secure(&self) -> bool {
        self.secure
    }

    /// Reads the next line from self.next_header_source.
    ///
    /// Reads until `CRLF` is reached. The next read will start
    ///  at the first byte of the new line.
    fn read_next_line(&mut self) -> IoResult<AsciiString> {
        // PATCH: read from the buffer a piece at a time (upstream read one byte per
        // call); a bare LF stays part of the line, as upstream's did
        use std::io::BufRead;
        let mut buf = Vec::new();

        loop {
            let piece = match self.next_header_source.fill_buf() {
                Ok(piece) => piece,
                Err(e) if e.kind() == ErrorKind::Interrupted => continue,
                Err(e) => return Err(e),
            };
            if piece.is_empty() {
                return Err(IoError::new(ErrorKind::ConnectionAborted, "Unexpected EOF"));
            }

            if self.closing.load(std::sync::atomic::Ordering::SeqCst) {
                // PATCH: the handler ended this connection; buffered bytes are not a request
                return Err(IoError::new(ErrorKind::ConnectionAborted, "connection closed by handler"));
            }

            let line_end = line_end(&buf, piece);
            let taken = line_end.map_or(piece.len(), |lf| lf + 1);
            buf.extend_from_slice(&piece[..line_end.unwrap_or(piece.len())]);
            self.next_header_source.consume(taken);

            if buf.len() > MAX_LINE {
                // PATCH: upstream grew the line without bound
                return Err(IoError::new(ErrorKind::InvalidData, "header line too long"));
            }
            if line_end.is_some() {
                buf.pop(); // removing the '\r'
                return AsciiString::from_ascii(buf)
                    .map_err(|_| IoError::new(ErrorKind::InvalidInput, "Header is not in ASCII"));
            }
        }
    }

    /// Reads a request from the stream.
    /// Blocks until the header has been read.
    fn read(&mut self) -> Result<Request, ReadError> {
        let (method, path, version, headers) = {
            // reading the request line
            let (method, path, version) = {
                // PATCH: an over-long line, a bad request line and an idle timeout told apart
                let line = self.read_next_line().map_err(|e| match e.kind() {
                    ErrorKind::InvalidData => ReadError::HeadersTooLarge,
                    ErrorKind::InvalidInput => ReadError::WrongRequestLine,
                    // nothing of a next request had come: a quiet close, not a 408
                    ErrorKind::TimedOut | ErrorKind::WouldBlock => ReadError::IdleTimeout,
                    _ => ReadError::ReadIoError(e),
                })?;

                parse_request_line(
                    line.as_str().trim(), // TODO: remove this conversion
                )?
            };

            // getting all headers
            let headers = {
                let mut headers = Vec::new();
                loop {
                    let line = self.read_next_line().map_err(|e| match e.kind() {
                        ErrorKind::InvalidData => ReadError::HeadersTooLarge,
                        // PATCH: a non-ASCII header line is a 400, not a silent close
                        ErrorKind::InvalidInput => ReadError::WrongHeader(version.clone()),
                        ErrorKind::WouldBlock => {
                            ReadError::ReadIoError(IoError::new(ErrorKind::TimedOut, e))
                        }
                        _ => ReadError::ReadIoError(e),
                    })?;

                    if line.is_empty() {
                        break;
                    };
                    if headers.len() >= MAX_HEADERS {
                        return Err(ReadError::HeadersTooLarge);
                    }
                    // PATCH: the line untrimmed: a leading space (obsolete line
                    // folding) makes an invalid name and a 400, as RFC 9112 §5.2 asks
                    headers.push(match FromStr::from_str(line.as_str()) {
                        // TODO: remove this conversion
                        Ok(h) => h,
                        _ => return Err(ReadError::WrongHeader(version)),
                    });
                }

                headers
            };

            (method, path, version, headers)
        };

        // building the writer for the request
        let writer = self.sink.next().unwrap();

        // follow-up for next potential request
        let mut data_source = self.source.next().unwrap();
        std::mem::swap(&mut self.next_header_source, &mut data_source);

        // building the next reader
        let request = crate::request::new_request(
            self.secure,
            method,
            path,
            version.clone(),
            headers,
            *self.remote_addr.as_ref().unwrap(),
            data_source,
            writer,
            // PATCH: the socket handle and the close flag, for each request
            self.control.clone(),
            self.closing.clone(),
        )
        .map_err(|e| {
            use crate::request;
            match e {
                request::RequestCreationError::CreationIoError(e) => ReadError::ReadIoError(e),
                request::RequestCreationError::ExpectationFailed => {
                    ReadError::ExpectationFailed(version)
                }
                // PATCH: ambiguous Content-Length / Transfer-Encoding
                request::RequestCreationError::AmbiguousFraming(why) => {
                    ReadError::AmbiguousFraming(version, why)
                }
            }
        })?;

        // return the request
        Ok(request)
    }
}

impl Iterator for ClientConnection {
    type Item = Request;

    /// Blocks until the next Request is available.
    /// Returns None when no new Requests will come from the client.
    fn next(&mut self) -> Option<Request> {
        // PATCH: answers are built by error_answer (upstream imported Response here)
        // PATCH: a handler closed the connection (a body left unread): no further
        // request, and a lingering close
        if self.closing.load(std::sync::atomic::Ordering::SeqCst) {
            self.linger = true;
            return None;
        }
        // the client sent a "connection: close" header in this previous request
        //  or is using HTTP 1.0, meaning that no new request will come
        if self.no_more_requests {
            return None;
        }

        loop {
            let rq = match self.read() {
                Err(ReadError::WrongRequestLine) => {
                    let writer = self.sink.next().unwrap();
                    // PATCH: every error below is worded by error_answer (the embedder's page)
                    let response = error_answer(self.error_page.as_ref(), 400, "The request line is not valid HTTP/1.1.");
                    response
                        .raw_print(writer, HTTPVersion(1, 1), &[], false, None)
                        .ok();
                    self.linger = true; // PATCH: the client may still be sending
                    return None; // we don't know where the next request would start,
                                 // se we have to close
                }

                Err(ReadError::WrongHeader(ver)) => {
                    let writer = self.sink.next().unwrap();
                    // PATCH: worded by error_answer; over-long heads are a 431, an idle
                    // keep-alive ends quietly
                    let response = error_answer(self.error_page.as_ref(), 400, "A header line is not valid HTTP.");
                    response.raw_print(writer, ver, &[], false, None).ok();
                    self.linger = true; // PATCH: the client may still be sending
                    return None; // we don't know where the next request would start,
                                 // se we have to close
                }

                Err(ReadError::HeadersTooLarge) => {
                    let writer = self.sink.next().unwrap();
                    let response = error_answer(self.error_page.as_ref(), 431, "The request's headers are too large or too many.");
                    response
                        .raw_print(writer, HTTPVersion(1, 1), &[], false, None)
                        .ok();
                    self.linger = true; // PATCH: the client may still be sending
                    return None;
                }

                Err(ReadError::IdleTimeout) => return None,

                Err(ReadError::AmbiguousFraming(ver, why)) => {
                    let writer = self.sink.next().unwrap();
                    let response = error_answer(self.error_page.as_ref(), 400, why);
                    response.raw_print(writer, ver, &[], false, None).ok();
                    self.linger = true; // PATCH: the client may still be sending
                    return None; // where the next request would start is unknown: close
                }

                Err(ReadError::ReadIoError(ref err))
                    if err.kind() == ErrorKind::TimedOut || err.kind() == ErrorKind::WouldBlock =>
                {
                    // request timeout
                    let writer = self.sink.next().unwrap();
                    let response = error_answer(self.error_page.as_ref(), 408, "The request's headers did not arrive in time.");
                    response
                        .raw_print(writer, HTTPVersion(1, 1), &[], false, None)
                        .ok();
                    self.linger = true; // PATCH: the client may still be sending
                    return None; // closing the connection
                }

                Err(ReadError::ExpectationFailed(ver)) => {
                    let writer = self.sink.next().unwrap();
                    // PATCH: worded by error_answer, and the connection closed
                    let response = error_answer(self.error_page.as_ref(), 417, "Only Expect: 100-continue is supported.");
                    response.raw_print(writer, ver, &[], false, None).ok();
                    self.linger = true; // PATCH: the client may still be sending
                    return None; // TODO: should be recoverable, but needs handling in case of body
                }

                Err(ReadError::ReadIoError(_)) => return None,

                Ok(rq) => rq,
            };

            // checking HTTP version
            if *rq.http_version() > (1, 1) {
                // PATCH: the request's own writer: a second one from the sink waited for
                // this request's to be dropped, for ever (the connection's thread hung)
                let writer = rq.into_writer();
                let response = error_answer(self.error_page.as_ref(), 505, "This server only supports HTTP versions 1.0 and 1.1.");
                response
                    .raw_print(writer, HTTPVersion(1, 1), &[], false, None)
                    .ok();
                self.linger = true; // PATCH: the client may still be sending
                return None; // PATCH: the body's length is unknown; close
            }

            // updating the status of the connection
            let connection_header = rq
                .headers()
                .iter()
                .find(|h| h.field.equiv("Connection"))
                .map(|h| h.value.as_str());

            let lowercase = connection_header.map(|h| h.to_ascii_lowercase());

            match lowercase {
                Some(ref val) if val.contains("close") => self.no_more_requests = true,
                Some(ref val) if val.contains("upgrade") => self.no_more_requests = true,
                Some(ref val)
                    if !val.contains("keep-alive") && *rq.http_version() == HTTPVersion(1, 0) =>
                {
                    self.no_more_requests = true
                }
                None if *rq.http_version() == HTTPVersion(1, 0) => self.no_more_requests = true,
                _ => (),
            };

            // returning the request
            return Some(rq);
        }
    }
}

/// PATCH (outline-mcp-proxy): where in `piece` the line read so far (`line`) ends: the
/// first LF right after a CR (which may be the last byte of `line`).
fn line_end(line: &[u8], piece: &[u8]) -> Option<usize> {
    let mut from = 0;
    while let Some(at) = piece[from..].iter().position(|&b| b == b'\n') {
        let lf = from + at;
        let before = if lf == 0 { line.last() } else { piece.get(lf - 1) };
        if before == Some(&b'\r') {
            return Some(lf);
        }
        from = lf + 1;
    }
    None
}

/// PATCH (outline-mcp-proxy): errors found while reading a request are answered with
/// their status and a reason, in the embedder's words when it gave an error page (else
/// as plain text), and the connection is closed.
fn error_answer(
    page: Option<&crate::ErrorPage>,
    status: u16,
    reason: &str,
) -> crate::Response<std::io::Cursor<Vec<u8>>> {
    let (content_type, body) = crate::error_page_or_plain(page, status, reason);
    crate::Response::from_data(body)
        .with_status_code(crate::StatusCode(status))
        .with_header(
            format!("Content-Type: {}", content_type)
                .parse::<crate::Header>()
                .unwrap_or_else(|_| "Content-Type: text/plain".parse().expect("static header")),
        )
        .with_header("Connection: close".parse::<crate::Header>().expect("static header"))
}

/// Parses a "HTTP/1.1" string.
fn parse_http_version(version: &str) -> Result<HTTPVersion, ReadError> {
    let (major, minor) = match version {
        "HTTP/0.9" => (0, 9),
        "HTTP/1.0" => (1, 0),
        "HTTP/1.1" => (1, 1),
        "HTTP/2.0" => (2, 0),
        "HTTP/3.0" => (3, 0),
        _ => return Err(ReadError::WrongRequestLine),
    };

    Ok(HTTPVersion(major, minor))
}

/// Parses the request line of the request.
/// eg. GET / HTTP/1.1
fn parse_request_line(line: &str) -> Result<(Method, String, HTTPVersion), ReadError> {
    let mut parts = line.split(' ');

    let method = parts.next().and_then(|w| w.parse().ok());
    let path = parts.next().map(ToOwned::to_owned);
    let version = parts.next().and_then(|w| parse_http_version(w).ok());

    method
        .and_then(|method| Some((method, path?, version?)))
        .ok_or(ReadError::WrongRequestLine)
}

#[cfg(test)]
mod test {
    // PATCH: a line ends at the first CRLF, also when the CR ended the previous piece;
    // a bare LF is part of the line
    #[test]
    fn test_line_end() {
        assert_eq!(super::line_end(b"", b"GET / HTTP/1.1\r\nHost"), Some(15));
        assert_eq!(super::line_end(b"GET / HTTP/1.1\r", b"\nHost"), Some(0));
        assert_eq!(super::line_end(b"", b"a\nb\r\n"), Some(4));
        assert_eq!(super::line_end(b"a", b"\nb"), None);
        assert_eq!(super::line_end(b"", b"abc\r"), None);
    }

    #[test]
    fn test_parse_request_line() {
        let (method, path, ver) = super::parse_request_line("GET /hello HTTP/1.1").unwrap();

        assert!(method == crate::Method::Get);
        assert!(path == "/hello");
        assert!(ver == crate::common::HTTPVersion(1, 1));

        assert!(super::parse_request_line("GET /hello").is_err());
        assert!(super::parse_request_line("qsd qsd qsd").is_err());
    }
}
