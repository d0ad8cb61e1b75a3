//! # Simple usage
//!
//! ## Creating the server
//!
//! The easiest way to create a server is to call `Server::http()`.
//!
//! The `http()` function returns an `IoResult<Server>` which will return an error
//! in the case where the server creation fails (for example if the listening port is already
//! occupied).
//!
//! ```no_run
//! let server = tiny_http::Server::http("0.0.0.0:0").unwrap();
//! ```
//!
//! A newly-created `Server` will immediately start listening for incoming connections and HTTP
//! requests.
//!
//! ## Receiving requests
//!
//! Calling `server.recv()` will block until the next request is available.
//! This function returns an `IoResult<Request>`, so you need to handle the possible errors.
//!
//! ```no_run
//! # let server = tiny_http::Server::http("0.0.0.0:0").unwrap();
//!
//! loop {
//!     // blocks until the next request is received
//!     let request = match server.recv() {
//!         Ok(rq) => rq,
//!         Err(e) => { println!("error: {}", e); break }
//!     };
//!
//!     // do something with the request
//!     // ...
//! }
//! ```
//!
//! In a real-case scenario, you will probably want to spawn multiple worker tasks and call
//! `server.recv()` on all of them. Like this:
//!
//! ```no_run
//! # use std::sync::Arc;
//! # use std::thread;
//! # let server = tiny_http::Server::http("0.0.0.0:0").unwrap();
//! let server = Arc::new(server);
//! let mut guards = Vec::with_capacity(4);
//!
//! for _ in (0 .. 4) {
//!     let server = server.clone();
//!
//!     let guard = thread::spawn(move || {
//!         loop {
//!             let rq = server.recv().unwrap();
//!
//!             // ...
//!         }
//!     });
//!
//!     guards.push(guard);
//! }
//! ```
//!
//! If you don't want to block, you can call `server.try_recv()` instead.
//!
//! ## Handling requests
//!
//! The `Request` object returned by `server.recv()` contains informations about the client's request.
//! The most useful methods are probably `request.method()` and `request.url()` which return
//! the requested method (`GET`, `POST`, etc.) and url.
//!
//! To handle a request, you need to create a `Response` object. See the docs of this object for
//! more infos. Here is an example of creating a `Response` from a file:
//!
//! ```no_run
//! # use std::fs::File;
//! # use std::path::Path;
//! let response = tiny_http::Response::from_file(File::open(&Path::new("image.png")).unwrap());
//! ```
//!
//! All that remains to do is call `request.respond()`:
//!
//! ```no_run
//! # use std::fs::File;
//! # use std::path::Path;
//! # let server = tiny_http::Server::http("0.0.0.0:0").unwrap();
//! # let request = server.recv().unwrap();
//! # let response = tiny_http::Response::from_file(File::open(&Path::new("image.png")).unwrap());
//! let _ = request.respond(response);
//! ```
#![allow(dead_code, unused_imports)] // PATCH: silence upstream 0.12.0's own warnings
#![forbid(unsafe_code)]
#![deny(rust_2018_idioms)]
#![allow(clippy::match_like_matches_macro)]

#[cfg(any(feature = "ssl-openssl", feature = "ssl-rustls"))]
use zeroize::Zeroizing;

use std::error::Error;
use std::io::Error as IoError;
use std::io::ErrorKind as IoErrorKind;
use std::io::Result as IoResult;
use std::net::{Shutdown, TcpStream, ToSocketAddrs};
use std::sync::atomic::AtomicBool;
use std::sync::atomic::Ordering::Relaxed;
use std::sync::mpsc;
use std::sync::Arc;
use std::thread;
use std::time::Duration;

use client::ClientConnection;
use connection::Connection;
use util::MessagesQueue;

pub use common::{HTTPVersion, Header, HeaderField, Method, StatusCode};
pub use connection::{ConfigListenAddr, ListenAddr, Listener};
pub use request::{ReadWrite, Request};
pub use response::{Response, ResponseBox};
pub use test::TestRequest;

mod client;
mod common;
mod connection;
mod request;
mod response;
mod ssl;
mod test;
mod util;

/// The main class of this library.
///
/// Destroying this object will immediately close the listening socket and the reading
///  part of all the client's connections. Requests that have already been returned by
///  the `recv()` function will not close and the responses will be transferred to the client.
pub struct Server {
    // should be false as long as the server exists
    // when set to true, all the subtasks will close within a few hundreds ms
    close: Arc<AtomicBool>,

    // queue for messages received by child threads
    messages: Arc<MessagesQueue<Message>>,

    // result of TcpListener::local_addr()
    listening_addr: ListenAddr,

    // PATCH (outline-mcp-proxy): connections being served (with a handler), and the
    // accept thread, so the embedding program can notice that it ended
    live_connections: Arc<std::sync::atomic::AtomicUsize>,
    accept_thread: std::sync::Mutex<Option<thread::JoinHandle<()>>>,
}

/// PATCH (outline-mcp-proxy): how the embedding program words an error the library
/// answers by itself (a malformed request, a connection over the cap): given the status
/// and a reason, the content type and body. Without one, the reason as plain text.
pub type ErrorPage = Arc<dyn Fn(u16, &str) -> (String, Vec<u8>) + Send + Sync>;

/// PATCH (outline-mcp-proxy): a handler for each request on its connection's own
/// thread, the most connections served at once (0: no cap), and the error page.
#[derive(Clone)]
pub struct Handling {
    pub handler: Arc<dyn Fn(Request) + Send + Sync>,
    pub max_connections: usize,
    pub error_page: Option<ErrorPage>,
}

fn error_page_or_plain(page: Option<&ErrorPage>, status: u16, reason: &str) -> (String, Vec<u8>) {
    match page {
        Some(page) => page(status, reason),
        None => ("text/plain".to_string(), format!("{}\n", reason).into_bytes()),
    }
}

/// PATCH (outline-mcp-proxy): counts a connection as live while its thread runs.
struct LiveConnection(Arc<std::sync::atomic::AtomicUsize>);

impl Drop for LiveConnection {
    fn drop(&mut self) {
        self.0.fetch_sub(1, std::sync::atomic::Ordering::SeqCst);
    }
}

/// PATCH (outline-mcp-proxy): a connection beyond the cap gets a plain 503 and is
/// closed, before a thread is spent on it. The embedding program words its own errors;
/// this one never reaches it.
fn refuse_busy(mut sock: Connection, page: Option<&ErrorPage>) {
    use std::io::Write;
    if let Connection::Tcp(ref s) = sock {
        let _ = s.set_write_timeout(Some(Duration::from_secs(1)));
    }
    let (content_type, body) =
        error_page_or_plain(page, 503, "The proxy is serving as many connections as it may; try again shortly.");
    let head = format!(
        "HTTP/1.1 503 Service Unavailable\r\nRetry-After: 1\r\nContent-Type: {}\r\nContent-Length: {}\r\nConnection: close\r\n\r\n",
        content_type,
        body.len()
    );
    let _ = sock.write_all(head.as_bytes()).and_then(|_| sock.write_all(&body));
    let _ = sock.flush();
    if let Connection::Tcp(ref s) = sock {
        // a lingering close, as nginx does: the client's unread request would make the
        // close a reset, which can destroy the 503 before the client reads it
        util::lingering_close(s, util::Linger::REFUSAL);
    }
}

/// PATCH (outline-mcp-proxy): connections over the cap are answered by one thread, not
/// the accept loop (its lingering close must not hold accepting up) and not a thread
/// each (the cap is there to spare them); beyond its small queue they are dropped.
fn start_refuser(page: Option<ErrorPage>) -> Option<mpsc::SyncSender<Connection>> {
    let (tx, rx) = mpsc::sync_channel::<Connection>(64);
    let spawned = thread::Builder::new().name("refuse".into()).spawn(move || {
        for sock in rx {
            refuse_busy(sock, page.as_ref());
        }
    });
    match spawned {
        Ok(_) => Some(tx),
        Err(e) => {
            log::error!("no thread to answer connections over the cap ({}): they are dropped", e);
            None
        }
    }
}

enum Message {
    Error(IoError),
    NewRequest(Request),
}

impl From<IoError> for Message {
    fn from(e: IoError) -> Message {
        Message::Error(e)
    }
}

impl From<Request> for Message {
    fn from(rq: Request) -> Message {
        Message::NewRequest(rq)
    }
}

// this trait is to make sure that Server implements Share and Send
#[doc(hidden)]
trait MustBeShareDummy: Sync + Send {}
#[doc(hidden)]
impl MustBeShareDummy for Server {}

pub struct IncomingRequests<'a> {
    server: &'a Server,
}

/// Represents the parameters required to create a server.
#[derive(Debug, Clone)]
pub struct ServerConfig {
    /// The addresses to try to listen to.
    pub addr: ConfigListenAddr,

    /// If `Some`, then the server will use SSL to encode the communications.
    pub ssl: Option<SslConfig>,
}

/// Configuration of the server for SSL.
#[derive(Debug, Clone)]
pub struct SslConfig {
    /// Contains the public certificate to send to clients.
    pub certificate: Vec<u8>,
    /// Contains the ultra-secret private key used to decode communications.
    pub private_key: Vec<u8>,
}

impl Server {
    /// Shortcut for a simple server on a specific address.
    #[inline]
    pub fn http<A>(addr: A) -> Result<Server, Box<dyn Error + Send + Sync + 'static>>
    where
        A: ToSocketAddrs,
    {
        Server::new(ServerConfig {
            addr: ConfigListenAddr::from_socket_addrs(addr)?,
            ssl: None,
        })
    }

    /// Shortcut for an HTTPS server on a specific address.
    #[cfg(any(feature = "ssl-openssl", feature = "ssl-rustls"))]
    #[inline]
    pub fn https<A>(
        addr: A,
        config: SslConfig,
    ) -> Result<Server, Box<dyn Error + Send + Sync + 'static>>
    where
        A: ToSocketAddrs,
    {
        Server::new(ServerConfig {
            addr: ConfigListenAddr::from_socket_addrs(addr)?,
            ssl: Some(config),
        })
    }

    #[cfg(unix)]
    #[inline]
    /// Shortcut for a UNIX socket server at a specific path
    pub fn http_unix(
        path: &std::path::Path,
    ) -> Result<Server, Box<dyn Error + Send + Sync + 'static>> {
        Server::new(ServerConfig {
            addr: ConfigListenAddr::unix_from_path(path),
            ssl: None,
        })
    }

    /// Builds a new server that listens on the specified address.
    pub fn new(config: ServerConfig) -> Result<Server, Box<dyn Error + Send + Sync + 'static>> {
        let listener = config.addr.bind()?;
        Self::from_listener(listener, config.ssl)
    }

    /// Builds a new server using the specified TCP listener.
    ///
    /// This is useful if you've constructed TcpListener using some less usual method
    /// such as from systemd. For other cases, you probably want the `new()` function.
    pub fn from_listener<L: Into<Listener>>(
        listener: L,
        ssl_config: Option<SslConfig>,
    ) -> Result<Server, Box<dyn Error + Send + Sync + 'static>> {
        Self::from_listener_with_read_timeout(listener, ssl_config, None, None)
    }

    /// PATCH (outline-mcp-proxy): like `from_listener`, and every accepted TCP
    /// connection gets `read_timeout`, so a client that stops sending in the middle
    /// of its headers (or idles between keep-alive requests) is cut instead of
    /// holding a thread for ever. A caller that takes a connection over (an
    /// upgrade, a long body) can clear it through `Request::socket`.
    ///
    /// With a `handler`, each request is handled on its connection's own thread, one
    /// after another, instead of being queued for `recv()`: no hand-off between
    /// threads per request, and a long answer (a stream, a WebSocket) holds only its
    /// own connection.
    pub fn from_listener_with_read_timeout<L: Into<Listener>>(
        listener: L,
        ssl_config: Option<SslConfig>,
        read_timeout: Option<std::time::Duration>,
        handling: Option<Handling>,
    ) -> Result<Server, Box<dyn Error + Send + Sync + 'static>> {
        let listener = listener.into();
        // building the "close" variable
        let close_trigger = Arc::new(AtomicBool::new(false));

        // building the TcpListener
        let (server, local_addr) = {
            let local_addr = listener.local_addr()?;
            log::debug!("Server listening on {}", local_addr);
            (listener, local_addr)
        };

        // building the SSL capabilities
        #[cfg(all(feature = "ssl-openssl", feature = "ssl-rustls"))]
        compile_error!(
            "Features 'ssl-openssl' and 'ssl-rustls' must not be enabled at the same time"
        );
        #[cfg(not(any(feature = "ssl-openssl", feature = "ssl-rustls")))]
        type SslContext = ();
        #[cfg(any(feature = "ssl-openssl", feature = "ssl-rustls"))]
        type SslContext = crate::ssl::SslContextImpl;
        let ssl: Option<SslContext> = {
            match ssl_config {
                #[cfg(any(feature = "ssl-openssl", feature = "ssl-rustls"))]
                Some(config) => Some(SslContext::from_pem(
                    config.certificate,
                    Zeroizing::new(config.private_key),
                )?),
                #[cfg(not(any(feature = "ssl-openssl", feature = "ssl-rustls")))]
                Some(_) => return Err(
                    "Building a server with SSL requires enabling the `ssl` feature in tiny-http"
                        .into(),
                ),
                None => None,
            }
        };

        // creating a task where server.accept() is continuously called
        // and ClientConnection objects are pushed in the messages queue
        let messages = MessagesQueue::with_capacity(8);

        let inside_close_trigger = close_trigger.clone();
        let inside_messages = messages.clone();
        // PATCH: live connections counted; the accept thread kept, named, and its spawn checked
        let live_connections = Arc::new(std::sync::atomic::AtomicUsize::new(0));
        let inside_live = live_connections.clone();
        let refuser = handling.as_ref().filter(|h| h.max_connections > 0).and_then(|h| start_refuser(h.error_page.clone()));
        let accept_thread = thread::Builder::new().name("accept".into()).spawn(move || {
            // a tasks pool is used to dispatch the connections into threads
            // PATCH: with a handler no pool is made (its idle threads were spawned with a
            // panicking thread::spawn, which under a task limit killed the accept thread)
            let tasks_pool = if handling.is_none() { Some(util::TaskPool::new()) } else { None };

            log::debug!("Running accept thread");
            while !inside_close_trigger.load(Relaxed) {
                let new_client = match server.accept() {
                    Ok((sock, _)) => {
                        use util::RefinedTcpStream;
                        // PATCH: over the cap, refused before a thread is spent
                        if let Some(h) = handling.as_ref() {
                            let live = inside_live.load(std::sync::atomic::Ordering::SeqCst);
                            if h.max_connections > 0 && live >= h.max_connections {
                                log::warn!("at the connection cap ({}): refusing one with 503", h.max_connections);
                                // a full queue (or no refuser) drops the connection
                                if let Some(refuser) = refuser.as_ref() {
                                    let _ = refuser.try_send(sock);
                                }
                                continue;
                            }
                        }
                        // PATCH: header timeout, and a handle on the socket for the request
                        let control = sock.tcp_control(read_timeout);
                        let (read_closable, write_closable) = match ssl {
                            None => match RefinedTcpStream::try_new_http(sock) {
                                Ok(pair) => pair,
                                Err(e) => {
                                    // PATCH: out of descriptors: drop it, back off, go on
                                    log::error!("Error accepting new client: {}", e);
                                    thread::sleep(std::time::Duration::from_millis(50));
                                    continue;
                                }
                            },
                            #[cfg(any(feature = "ssl-openssl", feature = "ssl-rustls"))]
                            Some(ref ssl) => {
                                // trying to apply SSL over the connection
                                // if an error occurs, we just close the socket and resume listening
                                let sock = match ssl.accept(sock) {
                                    Ok(s) => s,
                                    Err(_) => continue,
                                };

                                RefinedTcpStream::new(sock)
                            }
                            #[cfg(not(any(feature = "ssl-openssl", feature = "ssl-rustls")))]
                            Some(ref _ssl) => unreachable!(),
                        };

                        let page = handling.as_ref().and_then(|h| h.error_page.clone());
                        Ok(ClientConnection::new(write_closable, read_closable, control, page))
                    }
                    Err(e) => Err(e),
                };

                match new_client {
                    Ok(client) => {
                        if let Some(handler) = handling.as_ref().map(|h| h.handler.clone()) {
                            // PATCH: a thread of its own for every connection, straight
                            // from accept (the pool's "is a thread waiting?" check raced:
                            // a burst queued connections behind threads that never came
                            // back from a stream). A thread that cannot be had (a task
                            // limit, memory) costs this connection only: it is closed,
                            // logged, and accepting goes on.
                            inside_live.fetch_add(1, std::sync::atomic::Ordering::SeqCst);
                            let live = LiveConnection(inside_live.clone());
                            let spawned = thread::Builder::new().name("conn".into()).spawn(move || {
                                let _live = live;
                                // PATCH: handled here, in order, on this connection's thread,
                                // then ended (lingering when the client may still send)
                                let mut client = client;
                                for rq in client.by_ref() {
                                    handler(rq);
                                }
                                client.end();
                            });
                            if let Err(e) = spawned {
                                log::error!("no thread for a new connection ({}): closed it", e);
                            }
                            continue;
                        }
                        let messages = inside_messages.clone();
                        let mut client = Some(client);
                        let Some(tasks_pool) = tasks_pool.as_ref() else { continue };
                        tasks_pool.spawn(Box::new(move || {
                            if let Some(client) = client.take() {
                                // Synchronization is needed for HTTPS requests to avoid a deadlock
                                if client.secure() {
                                    let (sender, receiver) = mpsc::channel();
                                    for rq in client {
                                        messages.push(rq.with_notify_sender(sender.clone()).into());
                                        receiver.recv().unwrap();
                                    }
                                } else {
                                    for rq in client {
                                        messages.push(rq.into());
                                    }
                                }
                            }
                        }));
                    }

                    Err(e) => {
                        // PATCH: an accept error (most often EMFILE: out of file
                        // descriptors) is passing; upstream ended the accept loop for
                        // good here and the server went deaf. Back off and go on.
                        log::error!("Error accepting new client: {}", e);
                        thread::sleep(std::time::Duration::from_millis(50));
                    }
                }
            }
            log::debug!("Terminating accept thread");
        })?;

        // result
        Ok(Server {
            messages,
            close: close_trigger,
            listening_addr: local_addr,
            live_connections,
            accept_thread: std::sync::Mutex::new(Some(accept_thread)),
        })
    }

    /// Returns an iterator for all the incoming requests.
    ///
    /// The iterator will return `None` if the server socket is shutdown.
    #[inline]
    pub fn incoming_requests(&self) -> IncomingRequests<'_> {
        IncomingRequests { server: self }
    }

    /// Returns the address the server is listening to.
    #[inline]
    pub fn server_addr(&self) -> ListenAddr {
        self.listening_addr.clone()
    }

    /// Returns the number of clients currently connected to the server.
    /// PATCH (outline-mcp-proxy): the connections being served with a handler
    /// (upstream's was `unimplemented!()`).
    pub fn num_connections(&self) -> usize {
        self.live_connections.load(std::sync::atomic::Ordering::SeqCst)
    }

    /// PATCH (outline-mcp-proxy): the accept thread's handle (once), so the embedding
    /// program can notice if accepting ever ends.
    pub fn take_accept_thread(&self) -> Option<thread::JoinHandle<()>> {
        self.accept_thread.lock().ok().and_then(|mut handle| handle.take())
    }

    /// Blocks until an HTTP request has been submitted and returns it.
    pub fn recv(&self) -> IoResult<Request> {
        match self.messages.pop() {
            Some(Message::Error(err)) => Err(err),
            Some(Message::NewRequest(rq)) => Ok(rq),
            None => Err(IoError::new(IoErrorKind::Other, "thread unblocked")),
        }
    }

    /// Same as `recv()` but doesn't block longer than timeout
    pub fn recv_timeout(&self, timeout: Duration) -> IoResult<Option<Request>> {
        match self.messages.pop_timeout(timeout) {
            Some(Message::Error(err)) => Err(err),
            Some(Message::NewRequest(rq)) => Ok(Some(rq)),
            None => Ok(None),
        }
    }

    /// Same as `recv()` but doesn't block.
    pub fn try_recv(&self) -> IoResult<Option<Request>> {
        match self.messages.try_pop() {
            Some(Message::Error(err)) => Err(err),
            Some(Message::NewRequest(rq)) => Ok(Some(rq)),
            None => Ok(None),
        }
    }

    /// Unblock thread stuck in recv() or incoming_requests().
    /// If there are several such threads, only one is unblocked.
    /// This method allows graceful shutdown of server.
    pub fn unblock(&self) {
        self.messages.unblock();
    }
}

impl Iterator for IncomingRequests<'_> {
    type Item = Request;
    fn next(&mut self) -> Option<Request> {
        self.server.recv().ok()
    }
}

impl Drop for Server {
    fn drop(&mut self) {
        self.close.store(true, Relaxed);
        // Connect briefly to ourselves to unblock the accept thread
        let maybe_stream = match &self.listening_addr {
            ListenAddr::IP(addr) => TcpStream::connect(addr).map(Connection::from),
            #[cfg(unix)]
            ListenAddr::Unix(addr) => {
                // TODO: use connect_addr when its stabilized.
                let path = addr.as_pathname().unwrap();
                std::os::unix::net::UnixStream::connect(path).map(Connection::from)
            }
        };
        if let Ok(stream) = maybe_stream {
            let _ = stream.shutdown(Shutdown::Both);
        }

        #[cfg(unix)]
        if let ListenAddr::Unix(addr) = &self.listening_addr {
            if let Some(path) = addr.as_pathname() {
                let _ = std::fs::remove_file(path);
            }
        }
    }
}
