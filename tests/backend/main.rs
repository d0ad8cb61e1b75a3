//! The test backend: a stand-in for mcp-outline inside a real container, built as the
//! example `test-backend` and imported as the image `outline-mcp-proxy-test-backend`.
//!
//! It serves, on 0.0.0.0:$MCP_PORT (3000):
//!   GET  /health            200 when ready (503 for ever with BACKEND_MODE=never-ready)
//!   ANY  /echo...           JSON of what it received: method, target, headers, body size and sha256
//!   GET  /sse?n=&interval_ms=   n events, one every interval_ms, as text/event-stream
//!   GET  /big?bytes=        a chunked body of that many bytes
//!   GET  /slow?ms=          answers after that long
//!   GET  /status/{code}     answers with that status
//!   GET  /env               whether OUTLINE_API_KEY is set, and its sha256
//!   GET  /ws                WebSocket echo ("close:CODE:REASON" makes it close with that code)
//!   GET  /ws-refuse         refuses the upgrade with 403
//!   ANY  /empty             202 with an empty body (Content-Length: 0), as MCP answers a notification
//!   GET  /seen              every request target received so far (to prove what never arrived)
//! BACKEND_MODE=exit exits at once with code 3; BACKEND_BOOT_MS delays listening;
//! BACKEND_MODE=probe with PROBE_ADDR=ip:port exits 0 if it can connect there, else 1.

use sha2::{Digest, Sha256};
use std::io::{BufRead, BufReader, Read, Write};
use std::net::{TcpListener, TcpStream};
use std::sync::Mutex;

static SEEN: Mutex<Vec<String>> = Mutex::new(Vec::new());
use std::time::Duration;
use tungstenite::protocol::{frame::coding::CloseCode, CloseFrame, Role, WebSocket};
use tungstenite::Message;

struct Request {
    method: String,
    target: String,
    headers: Vec<(String, String)>,
    body: Vec<u8>,
}

impl Request {
    fn header(&self, name: &str) -> Option<&str> {
        self.headers.iter().find(|(n, _)| n.eq_ignore_ascii_case(name)).map(|(_, v)| v.as_str())
    }

    fn query(&self, name: &str) -> Option<u64> {
        let query = self.target.split_once('?')?.1;
        query.split('&').filter_map(|kv| kv.split_once('=')).find(|(k, _)| *k == name)?.1.parse().ok()
    }
}

fn main() {
    let mode = std::env::var("BACKEND_MODE").unwrap_or_default();
    if mode == "exit" {
        eprintln!("BACKEND_MODE=exit: exiting");
        std::process::exit(3);
    }
    if mode == "probe" {
        std::process::exit(probe());
    }
    if let Some(ms) = std::env::var("BACKEND_BOOT_MS").ok().and_then(|v| v.parse().ok()) {
        std::thread::sleep(Duration::from_millis(ms));
    }
    let port = std::env::var("MCP_PORT").unwrap_or_else(|_| "3000".into());
    let listener = TcpListener::bind(format!("0.0.0.0:{port}")).expect("bind");
    widen_backlog(&listener);
    eprintln!("test backend listening on {port}");
    for stream in listener.incoming().flatten() {
        let never_ready = mode == "never-ready";
        std::thread::spawn(move || serve_connection(stream, never_ready));
    }
}

/// Listens with uvicorn's backlog (2048), as mcp-outline does; std's is 128.
fn widen_backlog(listener: &TcpListener) {
    use std::os::fd::AsRawFd;
    extern "C" {
        fn listen(fd: i32, backlog: i32) -> i32;
    }
    // SAFETY: the listener's own open descriptor; only its backlog changes.
    unsafe {
        listen(listener.as_raw_fd(), 2048);
    }
}

/// BACKEND_MODE=probe: can this container open a TCP connection to PROBE_ADDR
/// (ip:port)? Exit 0 when it can, 1 when it cannot within 2 s, 2 on a bad address.
fn probe() -> i32 {
    let Some(addr) = std::env::var("PROBE_ADDR").ok().and_then(|a| a.parse().ok()) else {
        eprintln!("PROBE_ADDR must be ip:port");
        return 2;
    };
    match TcpStream::connect_timeout(&addr, Duration::from_secs(2)) {
        Ok(_) => 0,
        Err(e) => {
            eprintln!("probe {addr}: {e}");
            1
        }
    }
}

/// The forged answer the hostile routes slip in.
const FORGED: &str = "HTTP/1.1 200 OK\r\nContent-Type: text/plain\r\nContent-Length: 6\r\n\r\nFORGED";

fn serve_connection(stream: TcpStream, never_ready: bool) {
    let Ok(write_half) = stream.try_clone() else { return };
    let mut reader = BufReader::new(stream);
    let mut writer = write_half;
    while let Some(request) = read_request(&mut reader) {
        let path = request.target.split('?').next().unwrap_or("").to_string();
        if path != "/seen" {
            SEEN.lock().unwrap_or_else(|e| e.into_inner()).push(format!("{} {}", request.method, request.target));
        }
        let keep_going = match path.as_str() {
            "/seen" => {
                let seen = SEEN.lock().unwrap_or_else(|e| e.into_inner()).clone();
                respond(&mut writer, 200, "application/json", serde_json::json!(seen).to_string().as_bytes())
            }
            "/health" if never_ready => respond(&mut writer, 503, "application/json", b"{\"ready\":false}"),
            "/health" => respond(&mut writer, 200, "application/json", b"{\"status\":\"ok\"}"),
            "/sse" => {
                sse(&mut writer, &request);
                false
            }
            "/big" => big(&mut writer, &request),
            "/slow" => {
                std::thread::sleep(Duration::from_millis(request.query("ms").unwrap_or(1000)));
                respond(&mut writer, 200, "application/json", b"{\"slow\":true}")
            }
            "/env" => env_report(&mut writer),
            "/ws" => {
                websocket_echo(reader, writer, &request);
                return;
            }
            "/ws-refuse" => respond(&mut writer, 403, "application/json", b"{\"refused\":true}"),
            "/empty" => respond(&mut writer, 202, "application/json", b""),
            // a container that frames one answer two ways (a Content-Length beside chunked),
            // with a whole second answer inside the chunks: a client told the length would
            // read that second answer as the answer to its next request
            "/two-framings" => {
                let inner = format!("hello{FORGED}");
                let head = "HTTP/1.1 200 OK\r\nContent-Type: text/plain\r\nContent-Length: 5\r\nTransfer-Encoding: chunked\r\n\r\n";
                let answer = format!("{head}{:x}\r\n{inner}\r\n0\r\n\r\n", inner.len());
                writer.write_all(answer.as_bytes()).and_then(|_| writer.flush()).is_ok()
            }
            // a container that sends more than its Content-Length: a second answer after the
            // first, on the same connection, before anyone asked
            "/overlong" => {
                let answer =
                    format!("HTTP/1.1 200 OK\r\nContent-Type: text/plain\r\nContent-Length: 2\r\n\r\nok{FORGED}");
                writer.write_all(answer.as_bytes()).and_then(|_| writer.flush()).is_ok()
            }
            p if p.starts_with("/status/") => {
                let code = p[8..].parse().unwrap_or(500);
                respond(&mut writer, code, "application/json", format!("{{\"status\":{code}}}").as_bytes())
            }
            _ => echo(&mut writer, &request),
        };
        if !keep_going || request.header("connection").is_some_and(|c| c.eq_ignore_ascii_case("close")) {
            return;
        }
    }
}

fn read_request(reader: &mut BufReader<TcpStream>) -> Option<Request> {
    let mut line = String::new();
    if reader.read_line(&mut line).ok()? == 0 {
        return None;
    }
    let mut parts = line.split_whitespace();
    let method = parts.next()?.to_string();
    let target = parts.next()?.to_string();
    let mut headers = Vec::new();
    loop {
        line.clear();
        reader.read_line(&mut line).ok()?;
        let l = line.trim_end();
        if l.is_empty() {
            break;
        }
        let (n, v) = l.split_once(':')?;
        headers.push((n.trim().to_string(), v.trim().to_string()));
    }
    let mut request = Request { method, target, headers, body: Vec::new() };
    if let Some(len) = request.header("content-length").and_then(|v| v.parse::<usize>().ok()) {
        let mut body = vec![0; len];
        reader.read_exact(&mut body).ok()?;
        request.body = body;
    } else if request.header("transfer-encoding").is_some_and(|v| v.eq_ignore_ascii_case("chunked")) {
        loop {
            line.clear();
            reader.read_line(&mut line).ok()?;
            let size = usize::from_str_radix(line.trim().split(';').next()?, 16).ok()?;
            if size == 0 {
                line.clear();
                reader.read_line(&mut line).ok()?;
                break;
            }
            let start = request.body.len();
            request.body.resize(start + size, 0);
            reader.read_exact(&mut request.body[start..]).ok()?;
            line.clear();
            reader.read_line(&mut line).ok()?;
        }
    }
    Some(request)
}

fn respond(w: &mut TcpStream, status: u16, content_type: &str, body: &[u8]) -> bool {
    let head = format!(
        "HTTP/1.1 {status} X\r\nContent-Type: {content_type}\r\nContent-Length: {}\r\nMcp-Session-Id: backend-session\r\nX-Backend: test\r\n\r\n",
        body.len()
    );
    w.write_all(head.as_bytes()).and_then(|_| w.write_all(body)).and_then(|_| w.flush()).is_ok()
}

fn echo(w: &mut TcpStream, request: &Request) -> bool {
    let host = std::fs::read_to_string("/etc/hostname").unwrap_or_default();
    let body = serde_json::json!({
        "method": request.method,
        "target": request.target,
        "headers": request.headers,
        "body_len": request.body.len(),
        "body_sha256": hex::encode(Sha256::digest(&request.body)),
        "hostname": host.trim(),
    });
    respond(w, 200, "application/json", body.to_string().as_bytes())
}

fn env_report(w: &mut TcpStream) -> bool {
    let key = std::env::var("OUTLINE_API_KEY").ok();
    let body = serde_json::json!({
        "OUTLINE_API_KEY_set": key.is_some(),
        "OUTLINE_API_KEY_sha256": key.map(|k| hex::encode(Sha256::digest(k.as_bytes()))),
        "OUTLINE_API_URL": std::env::var("OUTLINE_API_URL").ok(),
        "uid": std::fs::read_to_string("/proc/self/status").ok().and_then(|s| s.lines().find(|l| l.starts_with("Uid:")).map(str::to_string)),
    });
    respond(w, 200, "application/json", body.to_string().as_bytes())
}

fn sse(w: &mut TcpStream, request: &Request) {
    let n = request.query("n").unwrap_or(5);
    let interval = Duration::from_millis(request.query("interval_ms").unwrap_or(200));
    let head = "HTTP/1.1 200 OK\r\nContent-Type: text/event-stream\r\nCache-Control: no-cache\r\nTransfer-Encoding: chunked\r\nConnection: close\r\n\r\n";
    if w.write_all(head.as_bytes()).is_err() {
        return;
    }
    for i in 0..n {
        let event = format!("id: {i}\ndata: {{\"event\":{i}}}\n\n");
        let chunk = format!("{:x}\r\n{event}\r\n", event.len());
        if w.write_all(chunk.as_bytes()).and_then(|_| w.flush()).is_err() {
            return;
        }
        if i + 1 < n {
            std::thread::sleep(interval);
        }
    }
    let _ = w.write_all(b"0\r\n\r\n");
}

fn big(w: &mut TcpStream, request: &Request) -> bool {
    let mut left = request.query("bytes").unwrap_or(1 << 20);
    let head = "HTTP/1.1 200 OK\r\nContent-Type: application/octet-stream\r\nTransfer-Encoding: chunked\r\n\r\n";
    if w.write_all(head.as_bytes()).is_err() {
        return false;
    }
    let block = vec![b'x'; 64 * 1024];
    while left > 0 {
        let n = left.min(block.len() as u64) as usize;
        if w.write_all(format!("{n:x}\r\n").as_bytes())
            .and_then(|_| w.write_all(&block[..n]))
            .and_then(|_| w.write_all(b"\r\n"))
            .is_err()
        {
            return false;
        }
        left -= n as u64;
    }
    w.write_all(b"0\r\n\r\n").and_then(|_| w.flush()).is_ok()
}

fn websocket_echo(reader: BufReader<TcpStream>, mut writer: TcpStream, request: &Request) {
    let Some(key) = request.header("sec-websocket-key") else {
        respond(&mut writer, 400, "text/plain", b"no key");
        return;
    };
    let accept = tungstenite::handshake::derive_accept_key(key.as_bytes());
    let mut head = format!("HTTP/1.1 101 Switching Protocols\r\nUpgrade: websocket\r\nConnection: Upgrade\r\nSec-WebSocket-Accept: {accept}\r\n");
    if let Some(protocols) = request.header("sec-websocket-protocol") {
        let first = protocols.split(',').next().unwrap_or("").trim();
        head.push_str(&format!("Sec-WebSocket-Protocol: {first}\r\n"));
    }
    head.push_str("\r\n");
    if writer.write_all(head.as_bytes()).is_err() {
        return;
    }
    let stream = reader.into_inner();
    let mut ws = WebSocket::from_raw_socket(stream, Role::Server, None);
    loop {
        match ws.read() {
            Ok(Message::Text(text)) => {
                if let Some(rest) = text.as_str().strip_prefix("close:") {
                    let (code, reason) = rest.split_once(':').unwrap_or((rest, ""));
                    let code = CloseCode::from(code.parse::<u16>().unwrap_or(1000));
                    let _ = ws.close(Some(CloseFrame { code, reason: reason.to_string().into() }));
                    continue;
                }
                if ws.send(Message::Text(text)).is_err() {
                    return;
                }
            }
            Ok(Message::Binary(data)) => {
                if ws.send(Message::Binary(data)).is_err() {
                    return;
                }
            }
            Ok(_) => {}
            Err(_) => return,
        }
    }
}
