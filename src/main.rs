//! outline-mcp-proxy: one host, one Outline MCP server container per user.
//!
//! Each request carries the user's Outline API key. The proxy checks the key with
//! Outline (`POST {OUTLINE_URL}/api/auth.info`, cached by the key's sha256), starts or
//! wakes that user's own Docker container running `mcp-outline`, streams the request
//! to it and the answer back, and stops containers that have been idle too long.
//!
//! The file reads in the order a request meets it:
//!   1. configuration (environment variables, `--help`)
//!   2. the HTTP front door (tiny_http, a thread per connection, request checks)
//!   3. keys and the Outline verdict cache
//!   4. the container registry and the docker CLI
//!   5. proxying HTTP (streaming both ways) and relaying WebSockets
//!   6. the operator's endpoints (/health, /stats, /metrics)
//!   7. background threads (sleeper, Docker watcher) and the `check`/`cleanup` commands
//!   8. small helpers (time formats, base64, constant-time compare)
//!
//! Keys are never logged, never put in a process argument or a file, and only their
//! sha256 is kept in memory beyond the request that carried them.

use serde_json::{json, Value};
use sha2::{Digest, Sha256};
use std::collections::HashMap;
use std::io::{self, BufRead, BufReader, Read, Write};
use std::net::{Shutdown, SocketAddr, TcpStream, ToSocketAddrs};
use std::process::{Command, ExitCode, Stdio};
use std::sync::atomic::{AtomicBool, AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Condvar, Mutex, MutexGuard};
use std::thread;
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

// ======================================================================================
// 1. Configuration: every setting, its default and its meaning, read from the
//    environment once at start-up. A bad value stops start-up naming the variable.
// ======================================================================================

/// (variable, default, meaning). `--help` prints this table; `Config::load` reads it.
const SETTINGS: &[(&str, &str, &str)] = &[
    ("MCP_PROXY_LISTEN", "127.0.0.1:8000", "listen address"),
    ("OUTLINE_URL", "https://app.getoutline.com", "Outline base URL; keys are checked at {OUTLINE_URL}/api/auth.info (a trailing /api is accepted)"),
    ("MCP_PROXY_CONTAINER_OUTLINE_URL", "", "Outline URL given to containers as OUTLINE_API_URL ({url}/api); empty = OUTLINE_URL"),
    ("MCP_PROXY_IMAGE", "ghcr.io/vortiago/mcp-outline:latest", "container image"),
    ("MCP_PROXY_CONTAINER_PORT", "3000", "port the MCP server listens on inside the container"),
    ("MCP_PROXY_READY_PATH", "/health", "a GET here answering (status < 500) means the container is ready"),
    ("MCP_PROXY_CONTAINER_PREFIX", "mcp-", "container names are {prefix}{first 12 hex of sha256(key)}"),
    ("MCP_PROXY_NETWORK", "bridge", "docker network the containers join"),
    ("MCP_PROXY_MEMORY", "256m", "memory limit per container (swap is not allowed on top)"),
    ("MCP_PROXY_CPUS", "0.3", "CPU limit per container once it is ready"),
    ("MCP_PROXY_BOOT_CPUS", "1", "CPU limit while a container boots, brought down to MCP_PROXY_CPUS once ready (0 = no boot burst)"),
    ("MCP_PROXY_PIDS_LIMIT", "128", "process limit per container"),
    ("MCP_PROXY_KEY_MODE", "header", "header: the key reaches the container per request as x-outline-api-key and never Docker; env: OUTLINE_API_KEY is set in the container (older images)"),
    ("MCP_PROXY_IDLE_TIMEOUT", "15m", "stop a container idle this long (never one with a request or stream in flight)"),
    ("MCP_PROXY_SWEEP_INTERVAL", "60s", "how often the sleeper thread looks"),
    ("MCP_PROXY_REMOVE_AFTER", "7d", "remove containers stopped this long (0 = never)"),
    ("MCP_PROXY_AUTH_TTL", "60s", "how long Outline's yes for a key is trusted (0 = ask on every request)"),
    ("MCP_PROXY_AUTH_FAIL_TTL", "10s", "how long Outline's no for a key is trusted"),
    ("MCP_PROXY_START_TIMEOUT", "60s", "longest wait for a container to become ready"),
    ("MCP_PROXY_RESPONSE_TIMEOUT", "300s", "longest wait for a container's response headers (504 beyond); a streamed body has no limit"),
    ("MCP_PROXY_HEADER_TIMEOUT", "30s", "a client silent this long while sending its request (or between requests) is disconnected"),
    ("MCP_PROXY_MAX_RUNNING", "0", "0 = no cap; else, at the cap, the least recently used idle container is stopped, or 503 with Retry-After"),
    ("MCP_PROXY_MAX_BODY", "10m", "largest request body (413 beyond)"),
    ("MCP_PROXY_STATS_USER", "admin", "user for /stats and /metrics"),
    ("MCP_PROXY_STATS_PASSWORD", "", "when set, /stats and /metrics demand it (HTTP Basic), besides nginx"),
    ("MCP_PROXY_ALLOWED_ORIGINS", "", "comma-separated browser origins allowed; any other Origin header gets 403"),
    ("MCP_PROXY_DOCKER", "docker", "the docker CLI to run"),
    ("MCP_PROXY_LOG", "info", "log level: error, warn, info, debug, trace"),
];

#[derive(Clone, Copy, PartialEq, Eq, Debug)]
enum KeyMode {
    Header,
    Env,
}

#[derive(Clone, Debug)]
struct Config {
    listen: SocketAddr,
    outline_url: String,
    container_outline_url: String,
    image: String,
    container_port: u16,
    ready_path: String,
    prefix: String,
    network: String,
    memory_bytes: u64,
    cpus: f64,
    boot_cpus: f64,
    pids_limit: u32,
    key_mode: KeyMode,
    idle_timeout: Duration,
    sweep_interval: Duration,
    remove_after: Option<Duration>,
    auth_ttl: Duration,
    auth_fail_ttl: Duration,
    start_timeout: Duration,
    response_timeout: Duration,
    header_timeout: Duration,
    max_running: usize,
    max_body: u64,
    stats_user: String,
    stats_password: Option<String>,
    allowed_origins: Vec<String>,
    docker: String,
    log_level: log::LevelFilter,
}

/// A configuration error names the variable and what is wrong with its value.
fn bad_setting(name: &str, value: &str, expected: &str) -> String {
    format!("{name}={value:?} is not valid: expected {expected}")
}

impl Config {
    /// Reads every setting through `lookup` (the environment in production), falling
    /// back to the defaults of `SETTINGS`.
    fn load(lookup: &dyn Fn(&str) -> Option<String>) -> Result<Config, String> {
        let get = |name: &str| -> String {
            lookup(name).unwrap_or_else(|| {
                SETTINGS.iter().find(|(n, _, _)| *n == name).map(|(_, d, _)| d.to_string()).unwrap_or_default()
            })
        };
        let duration = |name: &str| {
            let v = get(name);
            parse_duration(&v).ok_or_else(|| bad_setting(name, &v, "a duration such as 90, 90s, 15m, 2h or 7d"))
        };
        let number = |name: &str| {
            let v = get(name);
            v.trim().parse::<u64>().map_err(|_| bad_setting(name, &v, "a whole number"))
        };
        let cpus = |name: &str| {
            let v = get(name);
            match v.trim().parse::<f64>() {
                Ok(c) if c.is_finite() && (0.0..=1024.0).contains(&c) => Ok(c),
                _ => Err(bad_setting(name, &v, "a number of CPUs such as 0.3")),
            }
        };
        let size = |name: &str| {
            let v = get(name);
            parse_size(&v).ok_or_else(|| bad_setting(name, &v, "a size such as 256m, 1g or a number of bytes"))
        };

        let listen_raw = get("MCP_PROXY_LISTEN");
        let listen = listen_raw
            .to_socket_addrs()
            .ok()
            .and_then(|mut a| a.next())
            .ok_or_else(|| bad_setting("MCP_PROXY_LISTEN", &listen_raw, "host:port"))?;
        let outline_url = normalize_outline_url("OUTLINE_URL", &get("OUTLINE_URL"))?;
        let container_outline_raw = get("MCP_PROXY_CONTAINER_OUTLINE_URL");
        let container_outline_url = if container_outline_raw.trim().is_empty() {
            outline_url.clone()
        } else {
            normalize_outline_url("MCP_PROXY_CONTAINER_OUTLINE_URL", &container_outline_raw)?
        };
        let image = get("MCP_PROXY_IMAGE");
        if image.trim().is_empty() || image.starts_with('-') {
            return Err(bad_setting("MCP_PROXY_IMAGE", &image, "an image reference"));
        }
        let port_raw = get("MCP_PROXY_CONTAINER_PORT");
        let container_port = match port_raw.trim().parse::<u16>() {
            Ok(p) if p > 0 => p,
            _ => return Err(bad_setting("MCP_PROXY_CONTAINER_PORT", &port_raw, "a port from 1 to 65535")),
        };
        let ready_path = get("MCP_PROXY_READY_PATH");
        if !ready_path.starts_with('/') || ready_path.chars().any(|c| c.is_whitespace() || c.is_control()) {
            return Err(bad_setting("MCP_PROXY_READY_PATH", &ready_path, "a path starting with /"));
        }
        let prefix = get("MCP_PROXY_CONTAINER_PREFIX");
        if !is_docker_name_safe(&prefix) {
            return Err(bad_setting(
                "MCP_PROXY_CONTAINER_PREFIX",
                &prefix,
                "letters, digits, '-', '_' or '.', starting with a letter or digit",
            ));
        }
        let network = get("MCP_PROXY_NETWORK");
        if !is_docker_name_safe(&network) {
            return Err(bad_setting("MCP_PROXY_NETWORK", &network, "a docker network name"));
        }
        let memory_bytes = size("MCP_PROXY_MEMORY")?;
        if memory_bytes < 6 * 1024 * 1024 {
            return Err(bad_setting("MCP_PROXY_MEMORY", &get("MCP_PROXY_MEMORY"), "at least 6m (Docker's minimum)"));
        }
        let cpus_limit = cpus("MCP_PROXY_CPUS")?;
        if cpus_limit <= 0.0 {
            return Err(bad_setting("MCP_PROXY_CPUS", &get("MCP_PROXY_CPUS"), "more than 0"));
        }
        let pids_raw = get("MCP_PROXY_PIDS_LIMIT");
        let pids_limit = match pids_raw.trim().parse::<u32>() {
            Ok(p) if p > 0 => p,
            _ => return Err(bad_setting("MCP_PROXY_PIDS_LIMIT", &pids_raw, "a positive whole number")),
        };
        let key_mode = match get("MCP_PROXY_KEY_MODE").trim() {
            "header" => KeyMode::Header,
            "env" => KeyMode::Env,
            other => return Err(bad_setting("MCP_PROXY_KEY_MODE", other, "header or env")),
        };
        let sweep_interval = duration("MCP_PROXY_SWEEP_INTERVAL")?;
        if sweep_interval.is_zero() {
            return Err(bad_setting("MCP_PROXY_SWEEP_INTERVAL", "0", "more than 0"));
        }
        let remove_after = duration("MCP_PROXY_REMOVE_AFTER")?;
        let start_timeout = duration("MCP_PROXY_START_TIMEOUT")?;
        let response_timeout = duration("MCP_PROXY_RESPONSE_TIMEOUT")?;
        let header_timeout = duration("MCP_PROXY_HEADER_TIMEOUT")?;
        for (name, d) in [
            ("MCP_PROXY_START_TIMEOUT", start_timeout),
            ("MCP_PROXY_RESPONSE_TIMEOUT", response_timeout),
            ("MCP_PROXY_HEADER_TIMEOUT", header_timeout),
        ] {
            if d.is_zero() {
                return Err(bad_setting(name, "0", "more than 0"));
            }
        }
        let max_running = number("MCP_PROXY_MAX_RUNNING")? as usize;
        let stats_password = Some(get("MCP_PROXY_STATS_PASSWORD")).filter(|p| !p.is_empty());
        let allowed_origins = get("MCP_PROXY_ALLOWED_ORIGINS")
            .split(',')
            .map(|o| o.trim().trim_end_matches('/').to_ascii_lowercase())
            .filter(|o| !o.is_empty())
            .collect();
        let docker = get("MCP_PROXY_DOCKER");
        if docker.trim().is_empty() {
            return Err(bad_setting("MCP_PROXY_DOCKER", &docker, "a command"));
        }
        let log_raw = get("MCP_PROXY_LOG");
        let log_level = log_raw
            .trim()
            .parse::<log::LevelFilter>()
            .map_err(|_| bad_setting("MCP_PROXY_LOG", &log_raw, "error, warn, info, debug or trace"))?;
        Ok(Config {
            listen,
            outline_url,
            container_outline_url,
            image,
            container_port,
            ready_path,
            prefix,
            network,
            memory_bytes,
            cpus: cpus_limit,
            boot_cpus: cpus("MCP_PROXY_BOOT_CPUS")?,
            pids_limit,
            key_mode,
            idle_timeout: duration("MCP_PROXY_IDLE_TIMEOUT")?,
            sweep_interval,
            remove_after: Some(remove_after).filter(|d| !d.is_zero()),
            auth_ttl: duration("MCP_PROXY_AUTH_TTL")?,
            auth_fail_ttl: duration("MCP_PROXY_AUTH_FAIL_TTL")?,
            start_timeout,
            response_timeout,
            header_timeout,
            max_running,
            max_body: size("MCP_PROXY_MAX_BODY")?,
            stats_user: get("MCP_PROXY_STATS_USER"),
            stats_password,
            allowed_origins,
            docker,
            log_level,
        })
    }

    /// The CPU limit a container boots with: the burst when it is larger than the
    /// steady limit, else the steady limit.
    fn boot_cpus(&self) -> f64 {
        self.boot_cpus.max(self.cpus)
    }

    fn has_boot_burst(&self) -> bool {
        self.boot_cpus > self.cpus
    }
}

/// `90`, `90s`, `15m`, `2h`, `7d` (and `250ms`).
fn parse_duration(text: &str) -> Option<Duration> {
    let t = text.trim();
    let (digits, unit) = t.split_at(t.find(|c: char| !c.is_ascii_digit()).unwrap_or(t.len()));
    if digits.is_empty() {
        return None;
    }
    let n: u64 = digits.parse().ok()?;
    let secs = |mult: u64| n.checked_mul(mult).map(Duration::from_secs);
    match unit {
        "" | "s" => secs(1),
        "ms" => Some(Duration::from_millis(n)),
        "m" => secs(60),
        "h" => secs(3600),
        "d" => secs(86400),
        _ => None,
    }
}

/// `256m`, `1g`, `512k`, or bytes.
fn parse_size(text: &str) -> Option<u64> {
    let t = text.trim().to_ascii_lowercase();
    let t = t.strip_suffix('b').unwrap_or(&t);
    let (digits, unit) = t.split_at(t.find(|c: char| !c.is_ascii_digit()).unwrap_or(t.len()));
    if digits.is_empty() {
        return None;
    }
    let n: u64 = digits.parse().ok()?;
    let mult: u64 = match unit {
        "" => 1,
        "k" => 1 << 10,
        "m" => 1 << 20,
        "g" => 1 << 30,
        _ => return None,
    };
    n.checked_mul(mult)
}

/// Outline's base URL without a trailing `/` or `/api`.
fn normalize_outline_url(name: &str, raw: &str) -> Result<String, String> {
    let mut url = raw.trim().trim_end_matches('/').to_string();
    if let Some(stripped) = url.strip_suffix("/api") {
        url = stripped.to_string();
    }
    let rest = url.strip_prefix("https://").or_else(|| url.strip_prefix("http://"));
    match rest {
        Some(host) if !host.is_empty() && !host.contains(char::is_whitespace) => Ok(url),
        _ => Err(bad_setting(name, raw, "an http:// or https:// URL")),
    }
}

fn is_docker_name_safe(s: &str) -> bool {
    let mut chars = s.chars();
    matches!(chars.next(), Some(c) if c.is_ascii_alphanumeric())
        && chars.all(|c| c.is_ascii_alphanumeric() || "-_.".contains(c))
}

fn print_help() {
    println!(
        "outline-mcp-proxy {} — per-user Outline MCP containers behind one proxy\n\n\
         usage: outline-mcp-proxy [serve|check|cleanup|--help|--version]\n\n\
         \x20 serve     run the proxy (default)\n\
         \x20 check     verify Docker, the image, Outline and the settings; exit 0 or 1\n\
         \x20 cleanup   remove this proxy's containers stopped longer than MCP_PROXY_REMOVE_AFTER\n\n\
         settings (environment variables, default in brackets):",
        env!("CARGO_PKG_VERSION")
    );
    for (name, default, meaning) in SETTINGS {
        println!("  {name} [{default}]\n      {meaning}");
    }
    println!("\ndurations: 90, 90s, 15m, 2h, 7d; sizes: 256m, 1g, bytes");
}

// ======================================================================================
// 2. The HTTP front door: tiny_http (vendored, see vendor/tiny_http/PATCHES.md) parses
//    each request, refuses ambiguous framing, and hands it to the handler on its
//    connection's own thread. What else is not fit to forward is refused here.
// ======================================================================================

/// Everything a handler needs from the request line and headers.
struct Incoming {
    method: String,
    target: String,
    path: String,
    http10: bool,
    headers: Vec<(String, String)>,
    remote: Option<SocketAddr>,
    wants_close: bool,
}

impl Incoming {
    fn from(request: &tiny_http::Request) -> Incoming {
        let headers: Vec<(String, String)> = request
            .headers()
            .iter()
            .map(|h| (h.field.as_str().as_str().to_string(), h.value.as_str().to_string()))
            .collect();
        let target = request.url().to_string();
        let path = target.split('?').next().unwrap_or("").to_string();
        let http10 = *request.http_version() == (1, 0);
        let connection = header_value(&headers, "connection").unwrap_or("").to_ascii_lowercase();
        let wants_close = connection.contains("close") || (http10 && !connection.contains("keep-alive"));
        Incoming {
            method: request.method().as_str().to_string(),
            target,
            path,
            http10,
            headers,
            remote: request.remote_addr().copied(),
            wants_close,
        }
    }

    fn header(&self, name: &str) -> Option<&str> {
        header_value(&self.headers, name)
    }

    fn is_websocket_upgrade(&self) -> bool {
        self.header("upgrade").is_some_and(|u| u.trim().eq_ignore_ascii_case("websocket"))
            && header_tokens(&self.headers, "connection").iter().any(|t| t == "upgrade")
    }
}

fn header_value<'a>(headers: &'a [(String, String)], name: &str) -> Option<&'a str> {
    headers.iter().find(|(n, _)| n.eq_ignore_ascii_case(name)).map(|(_, v)| v.as_str())
}

/// Lower-cased comma-separated tokens of every header of that name.
fn header_tokens(headers: &[(String, String)], name: &str) -> Vec<String> {
    headers
        .iter()
        .filter(|(n, _)| n.eq_ignore_ascii_case(name))
        .flat_map(|(_, v)| v.split(','))
        .map(|t| t.trim().to_ascii_lowercase())
        .filter(|t| !t.is_empty())
        .collect()
}

/// Refuses what is not HTTP the proxy will forward: the target must be origin-form,
/// header names tokens, values free of control characters. (Where the body ends —
/// Content-Length and Transfer-Encoding — is checked earlier, in the patched
/// tiny_http, before anything else is read from the connection.)
fn check_request_form(incoming: &Incoming) -> Result<(), ProxyError> {
    let bad = |m: &str| Err(ProxyError::BadRequest(m.to_string()));
    if !incoming.target.starts_with('/') {
        return bad("The request target must be a path starting with '/'.");
    }
    if incoming.target.bytes().any(|b| b <= b' ' || b == 0x7f) {
        return bad("The request target contains control characters or spaces.");
    }
    for (name, value) in &incoming.headers {
        if name.is_empty() || !name.bytes().all(is_token_byte) {
            return bad("A header name is not a valid HTTP token.");
        }
        if value.bytes().any(|b| (b < b' ' && b != b'\t') || b == 0x7f) {
            return bad("A header value contains control characters.");
        }
    }
    Ok(())
}

fn is_token_byte(b: u8) -> bool {
    b.is_ascii_alphanumeric() || b"!#$%&'*+-.^_`|~".contains(&b)
}

/// Binds the listener with the patched tiny_http: a header timeout on every
/// connection, and each request handled on its connection's own thread (no hand-off
/// per request; a long stream holds only its own connection). The server stops
/// accepting when the returned value is dropped.
fn start_server(proxy: &Arc<Proxy>) -> Result<tiny_http::Server, String> {
    let cfg = &proxy.cfg;
    let listener =
        std::net::TcpListener::bind(cfg.listen).map_err(|e| format!("cannot listen on {}: {e}", cfg.listen))?;
    let handler_proxy = proxy.clone();
    let handler: Arc<dyn Fn(tiny_http::Request) + Send + Sync> =
        Arc::new(move |request| handle_request(&handler_proxy, request));
    let server =
        tiny_http::Server::from_listener_with_read_timeout(listener, None, Some(cfg.header_timeout), Some(handler))
            .map_err(|e| format!("cannot serve on {}: {e}", cfg.listen))?;
    log::info!(
        "listening on {} (image {}, key mode {:?}, Outline {})",
        cfg.listen,
        cfg.image,
        cfg.key_mode,
        cfg.outline_url
    );
    Ok(server)
}

/// One request from start to log line.
fn handle_request(proxy: &Arc<Proxy>, request: tiny_http::Request) {
    let started = Instant::now();
    let incoming = Incoming::from(&request);
    let _in_flight = InFlight::enter(proxy);
    let mut log_ctx = LogContext::default();
    let routed = if proxy.stopping.load(Ordering::SeqCst) {
        reject(request, ProxyError::ShuttingDown)
    } else {
        route(proxy, request, &incoming, &mut log_ctx)
    };
    let status = match routed {
        Ok(status) => status,
        Err((request, error)) => {
            let status = error.status();
            if let Some(request) = request {
                send_error(*request, &incoming, &error);
            }
            if status >= 500 {
                log::warn!("{} {}: {}", incoming.method, incoming.path, error.message());
            }
            status
        }
    };
    log::info!(
        "{} {} {} {}ms user={} container={}",
        incoming.method,
        log_safe(&incoming.path),
        status,
        started.elapsed().as_millis(),
        log_ctx.user.as_deref().unwrap_or("-"),
        log_ctx.container.as_deref().unwrap_or("-"),
    );
}

/// Paths are logged without their query, and cut short, with control characters
/// replaced: a log line is one line.
fn log_safe(path: &str) -> String {
    path.chars().take(200).map(|c| if c.is_control() { '?' } else { c }).collect()
}

#[derive(Default)]
struct LogContext {
    user: Option<String>,
    container: Option<String>,
}

/// Counts requests in flight (or, with `long_lived`, the open-ended ones among
/// them), so that a SIGTERM can wait for the others.
struct InFlight<'a>(&'a AtomicUsize);

impl<'a> InFlight<'a> {
    fn enter(proxy: &'a Proxy) -> InFlight<'a> {
        proxy.in_flight.fetch_add(1, Ordering::SeqCst);
        InFlight(&proxy.in_flight)
    }

    fn long_lived(proxy: &'a Proxy) -> InFlight<'a> {
        proxy.long_lived.fetch_add(1, Ordering::SeqCst);
        InFlight(&proxy.long_lived)
    }
}

impl Drop for InFlight<'_> {
    fn drop(&mut self) {
        self.0.fetch_sub(1, Ordering::SeqCst);
    }
}

/// A failed route hands the request back (boxed: it is large) when it has not yet
/// been answered, so the caller can send the error.
type RouteResult = Result<u16, (Option<Box<tiny_http::Request>>, ProxyError)>;

fn reject(request: tiny_http::Request, error: ProxyError) -> RouteResult {
    Err((Some(Box::new(request)), error))
}

/// Checks framing, then sends the request to the endpoint or container it is for.
fn route(
    proxy: &Arc<Proxy>,
    request: tiny_http::Request,
    incoming: &Incoming,
    log_ctx: &mut LogContext,
) -> RouteResult {
    if let Err(e) = check_request_form(incoming) {
        return reject(request, e);
    }
    if let Some(len) = incoming.header("content-length").and_then(|v| v.trim().parse::<u64>().ok()) {
        if len > proxy.cfg.max_body {
            return reject(request, ProxyError::TooLarge(proxy.cfg.max_body));
        }
    }
    if let Err(e) = check_origin(&proxy.cfg, incoming) {
        return reject(request, e);
    }
    match (incoming.method.as_str(), incoming.path.as_str()) {
        ("GET" | "HEAD", "/health") => return health_endpoint(proxy, request, incoming, log_ctx),
        ("GET" | "HEAD", "/stats") => return stats_endpoint(proxy, request, incoming, false),
        ("GET" | "HEAD", "/metrics") => return stats_endpoint(proxy, request, incoming, true),
        _ => {}
    }
    let (key, user, name) = match identify(proxy, incoming, log_ctx) {
        Ok(who) => who,
        Err(e) => return reject(request, e),
    };
    let websocket = incoming.is_websocket_upgrade();
    let lease = match proxy.acquire(&name, &key, &user, websocket) {
        Ok(lease) => lease,
        Err(e) => return reject(request, e),
    };
    if websocket {
        relay_websocket(proxy, request, incoming, &key, &lease)
    } else {
        proxy_http(proxy, request, incoming, &key, &lease)
    }
}

/// Whose request this is: the key, Outline's user for it, and the name of their
/// container (also noted for the request's log line).
fn identify(
    proxy: &Proxy,
    incoming: &Incoming,
    log_ctx: &mut LogContext,
) -> Result<(String, User, String), ProxyError> {
    let key = extract_key(incoming)?;
    let user = proxy.authenticate(&key)?;
    let name = container_name(&proxy.cfg.prefix, &key);
    log_ctx.user = Some(user.name.clone());
    log_ctx.container = Some(name.clone());
    Ok((key, user, name))
}

/// The MCP spec's DNS-rebinding rule: a browser Origin must be one we allow.
fn check_origin(cfg: &Config, incoming: &Incoming) -> Result<(), ProxyError> {
    match incoming.header("origin") {
        None => Ok(()),
        Some(origin) => {
            let origin = origin.trim().trim_end_matches('/').to_ascii_lowercase();
            if cfg.allowed_origins.contains(&origin) {
                Ok(())
            } else {
                Err(ProxyError::Forbidden("This Origin is not allowed to use the proxy.".into()))
            }
        }
    }
}

/// Every way a request can fail, each with its status, code and message.
#[derive(Clone, Debug)]
enum ProxyError {
    BadRequest(String),
    Unauthorized(String),
    Forbidden(String),
    TooLarge(u64),
    RequestTimeout(String),
    OutlineUnreachable(String),
    ContainerUnreachable(String),
    DockerUnavailable(String),
    ContainerFailed(String),
    StartTimeout(String),
    AtCapacity(usize),
    GatewayTimeout(String),
    ShuttingDown,
}

impl ProxyError {
    fn status(&self) -> u16 {
        match self {
            ProxyError::BadRequest(_) => 400,
            ProxyError::Unauthorized(_) => 401,
            ProxyError::Forbidden(_) => 403,
            ProxyError::RequestTimeout(_) => 408,
            ProxyError::TooLarge(_) => 413,
            ProxyError::OutlineUnreachable(_) | ProxyError::ContainerUnreachable(_) => 502,
            ProxyError::DockerUnavailable(_)
            | ProxyError::ContainerFailed(_)
            | ProxyError::StartTimeout(_)
            | ProxyError::AtCapacity(_)
            | ProxyError::ShuttingDown => 503,
            ProxyError::GatewayTimeout(_) => 504,
        }
    }

    fn code(&self) -> &'static str {
        match self {
            ProxyError::BadRequest(_) => "bad_request",
            ProxyError::Unauthorized(_) => "unauthorized",
            ProxyError::Forbidden(_) => "forbidden",
            ProxyError::RequestTimeout(_) => "request_timeout",
            ProxyError::TooLarge(_) => "body_too_large",
            ProxyError::OutlineUnreachable(_) => "outline_unreachable",
            ProxyError::ContainerUnreachable(_) => "container_unreachable",
            ProxyError::DockerUnavailable(_) => "docker_unavailable",
            ProxyError::ContainerFailed(_) => "container_failed",
            ProxyError::StartTimeout(_) => "start_timeout",
            ProxyError::AtCapacity(_) => "at_capacity",
            ProxyError::GatewayTimeout(_) => "container_timeout",
            ProxyError::ShuttingDown => "shutting_down",
        }
    }

    fn message(&self) -> String {
        match self {
            ProxyError::BadRequest(m)
            | ProxyError::Unauthorized(m)
            | ProxyError::Forbidden(m)
            | ProxyError::RequestTimeout(m)
            | ProxyError::OutlineUnreachable(m)
            | ProxyError::ContainerUnreachable(m)
            | ProxyError::DockerUnavailable(m)
            | ProxyError::ContainerFailed(m)
            | ProxyError::StartTimeout(m)
            | ProxyError::GatewayTimeout(m) => m.clone(),
            ProxyError::TooLarge(max) => {
                format!("The request body is larger than the {max} bytes this proxy accepts.")
            }
            ProxyError::AtCapacity(max) => {
                format!("All {max} container slots are busy with requests in flight; try again shortly.")
            }
            ProxyError::ShuttingDown => "The proxy is restarting; try again shortly.".into(),
        }
    }

    fn retry_after(&self) -> Option<u32> {
        match self {
            ProxyError::AtCapacity(_) => Some(30),
            ProxyError::DockerUnavailable(_)
            | ProxyError::StartTimeout(_)
            | ProxyError::ContainerFailed(_)
            | ProxyError::ShuttingDown => Some(10),
            _ => None,
        }
    }

    /// After these the rest of the request may still be on the wire: close the
    /// connection rather than read it as the next request.
    fn closes_connection(&self) -> bool {
        matches!(self, ProxyError::BadRequest(_) | ProxyError::TooLarge(_) | ProxyError::RequestTimeout(_))
    }
}

/// Writes a complete response with a fixed body.
fn send_body(
    request: tiny_http::Request,
    incoming: &Incoming,
    status: u16,
    headers: &[(String, String)],
    body: &[u8],
    close: bool,
) -> io::Result<()> {
    let socket = request.socket();
    let close = close || incoming.wants_close;
    if close {
        request.close_connection();
    }
    let mut writer = request.into_writer();
    let mut head = response_head(status, headers, close);
    head.push_str(&format!("Content-Length: {}\r\n\r\n", body.len()));
    writer.write_all(head.as_bytes())?;
    if incoming.method != "HEAD" {
        writer.write_all(body)?;
    }
    writer.flush()?;
    drop(writer);
    if close {
        if let Some(socket) = socket {
            close_socket(&socket);
        }
    }
    Ok(())
}

/// Ends a connection whose rest must not be read as another request.
fn close_socket(socket: &TcpStream) {
    let _ = socket.shutdown(Shutdown::Write);
    let _ = socket.shutdown(Shutdown::Read);
}

fn send_json(request: tiny_http::Request, incoming: &Incoming, status: u16, value: &Value, extra: &[(String, String)]) {
    let mut headers = vec![
        ("Content-Type".to_string(), "application/json".to_string()),
        ("Cache-Control".to_string(), "no-store".to_string()),
    ];
    headers.extend_from_slice(extra);
    let _ = send_body(request, incoming, status, &headers, value.to_string().as_bytes(), false);
}

fn send_error(request: tiny_http::Request, incoming: &Incoming, error: &ProxyError) {
    let mut headers = vec![
        ("Content-Type".to_string(), "application/json".to_string()),
        ("Cache-Control".to_string(), "no-store".to_string()),
    ];
    if let Some(secs) = error.retry_after() {
        headers.push(("Retry-After".to_string(), secs.to_string()));
    }
    if error.status() == 401 {
        headers.push(("WWW-Authenticate".to_string(), "Bearer realm=\"outline-mcp-proxy\"".to_string()));
    }
    let body = json!({"error": error.code(), "message": error.message()}).to_string();
    let _ = send_body(request, incoming, error.status(), &headers, body.as_bytes(), error.closes_connection());
}

/// Status line and headers, without the framing header and the blank line.
fn response_head(status: u16, headers: &[(String, String)], close: bool) -> String {
    let mut head = format!("HTTP/1.1 {} {}\r\n", status, reason_phrase(status));
    for (name, value) in headers {
        head.push_str(name);
        head.push_str(": ");
        head.push_str(value);
        head.push_str("\r\n");
    }
    if close {
        head.push_str("Connection: close\r\n");
    }
    head
}

fn reason_phrase(status: u16) -> &'static str {
    match status {
        100 => "Continue",
        101 => "Switching Protocols",
        200 => "OK",
        201 => "Created",
        202 => "Accepted",
        204 => "No Content",
        206 => "Partial Content",
        301 => "Moved Permanently",
        302 => "Found",
        304 => "Not Modified",
        307 => "Temporary Redirect",
        308 => "Permanent Redirect",
        400 => "Bad Request",
        401 => "Unauthorized",
        403 => "Forbidden",
        404 => "Not Found",
        405 => "Method Not Allowed",
        406 => "Not Acceptable",
        408 => "Request Timeout",
        409 => "Conflict",
        413 => "Content Too Large",
        415 => "Unsupported Media Type",
        422 => "Unprocessable Content",
        429 => "Too Many Requests",
        431 => "Request Header Fields Too Large",
        500 => "Internal Server Error",
        502 => "Bad Gateway",
        503 => "Service Unavailable",
        504 => "Gateway Timeout",
        _ => "Status",
    }
}

// ======================================================================================
// 3. Keys and Outline's verdict: the key comes from X-Outline-API-Key or
//    Authorization: Bearer; Outline's answer is cached by the key's sha256, and
//    concurrent misses for one key share one call.
// ======================================================================================

const MAX_KEY_LEN: usize = 512;

/// The caller's key: X-Outline-API-Key, else `Authorization: Bearer`. Refuses
/// (without asking Outline) one that is empty, too long or not printable ASCII.
fn extract_key(incoming: &Incoming) -> Result<String, ProxyError> {
    let key = match incoming.header("x-outline-api-key") {
        Some(k) => k.trim().to_string(),
        None => match incoming.header("authorization") {
            Some(auth) => {
                let auth = auth.trim();
                match auth.get(..7) {
                    Some(scheme) if scheme.eq_ignore_ascii_case("bearer ") => auth[7..].trim().to_string(),
                    _ => {
                        return Err(ProxyError::Unauthorized(
                            "Authorization must be 'Bearer <Outline API key>'.".into(),
                        ))
                    }
                }
            }
            None => {
                return Err(ProxyError::Unauthorized(
                    "Send your Outline API key in the X-Outline-API-Key header (or Authorization: Bearer).".into(),
                ))
            }
        },
    };
    if !is_plausible_key(&key) {
        return Err(ProxyError::Unauthorized(format!(
            "The API key must be 1 to {MAX_KEY_LEN} printable ASCII characters without spaces."
        )));
    }
    Ok(key)
}

fn is_plausible_key(key: &str) -> bool {
    !key.is_empty() && key.len() <= MAX_KEY_LEN && key.bytes().all(|b| (0x21..=0x7e).contains(&b))
}

fn key_hash(key: &str) -> String {
    hex::encode(Sha256::digest(key.as_bytes()))
}

fn container_name(prefix: &str, key: &str) -> String {
    format!("{prefix}{}", &key_hash(key)[..12])
}

/// Who a key belongs to, as Outline says.
#[derive(Clone, Debug, PartialEq)]
struct User {
    id: String,
    name: String,
    email: String,
}

/// A result many threads wait for while one thread works it out.
struct Flight<T: Clone> {
    result: Mutex<Option<T>>,
    done: Condvar,
}

impl<T: Clone> Flight<T> {
    fn new() -> Arc<Flight<T>> {
        Arc::new(Flight { result: Mutex::new(None), done: Condvar::new() })
    }

    fn finish(&self, value: T) {
        *lock(&self.result) = Some(value);
        self.done.notify_all();
    }

    fn wait(&self) -> T {
        let mut guard = lock(&self.result);
        loop {
            if let Some(value) = guard.as_ref() {
                return value.clone();
            }
            guard = self.done.wait(guard).unwrap_or_else(|e| e.into_inner());
        }
    }
}

type AuthResult = Result<User, ProxyError>;

enum AuthSlot {
    Known { verdict: AuthResult, until: Instant },
    Asking(Arc<Flight<AuthResult>>),
}

#[derive(Default)]
struct AuthCounters {
    hits: AtomicU64,
    misses: AtomicU64,
    failures: AtomicU64,
    outline_calls: AtomicU64,
}

impl Proxy {
    /// Outline's verdict on a key: from the cache while it is fresh, else one call
    /// to Outline shared by every request for that key that arrives meanwhile.
    fn authenticate(&self, key: &str) -> AuthResult {
        let hash = key_hash(key);
        let flight = {
            let mut cache = lock(&self.auth_cache);
            match cache.get(&hash) {
                Some(AuthSlot::Known { verdict, until }) if *until > Instant::now() => {
                    self.auth_counters.hits.fetch_add(1, Ordering::Relaxed);
                    return self.count_failure(verdict.clone());
                }
                Some(AuthSlot::Asking(flight)) => {
                    let flight = flight.clone();
                    drop(cache);
                    self.auth_counters.hits.fetch_add(1, Ordering::Relaxed);
                    return self.count_failure(flight.wait());
                }
                _ => {
                    let flight = Flight::new();
                    cache.insert(hash.clone(), AuthSlot::Asking(flight.clone()));
                    flight
                }
            }
        };
        self.auth_counters.misses.fetch_add(1, Ordering::Relaxed);
        let verdict = self.ask_outline(key);
        let ttl = match &verdict {
            Ok(_) => self.cfg.auth_ttl,
            Err(ProxyError::Unauthorized(_)) => self.cfg.auth_fail_ttl,
            Err(_) => Duration::ZERO, // Outline down: ask again next time
        };
        {
            let mut cache = lock(&self.auth_cache);
            if ttl.is_zero() {
                cache.remove(&hash);
            } else {
                cache.insert(hash, AuthSlot::Known { verdict: verdict.clone(), until: Instant::now() + ttl });
            }
        }
        flight.finish(verdict.clone());
        self.count_failure(verdict)
    }

    fn count_failure(&self, verdict: AuthResult) -> AuthResult {
        if verdict.is_err() {
            self.auth_counters.failures.fetch_add(1, Ordering::Relaxed);
        }
        verdict
    }

    /// `POST {OUTLINE_URL}/api/auth.info` with the key as a Bearer token.
    fn ask_outline(&self, key: &str) -> AuthResult {
        self.auth_counters.outline_calls.fetch_add(1, Ordering::Relaxed);
        let url = format!("{}/api/auth.info", self.cfg.outline_url);
        let request = ureq::http::Request::post(&url)
            .header("Authorization", format!("Bearer {key}"))
            .header("Content-Type", "application/json")
            .header("Accept", "application/json")
            .body("{}".to_string())
            .map_err(|_| ProxyError::OutlineUnreachable("The Outline URL is not usable.".into()))?;
        let mut response = self.outline_agent.run(request).map_err(|e| {
            log::warn!("Outline auth.info failed: {}", describe_ureq_error(&e));
            ProxyError::OutlineUnreachable("Outline could not be reached to check the API key.".into())
        })?;
        match response.status().as_u16() {
            200 => {
                let body = response
                    .body_mut()
                    .with_config()
                    .limit(1 << 20)
                    .read_to_string()
                    .map_err(|_| ProxyError::OutlineUnreachable("Outline's answer could not be read.".into()))?;
                parse_auth_info(&body)
                    .ok_or_else(|| ProxyError::OutlineUnreachable("Outline's auth.info answer had no user.".into()))
            }
            401 | 403 => Err(ProxyError::Unauthorized("Outline does not accept this API key.".into())),
            status => {
                log::warn!("Outline auth.info answered {status}");
                Err(ProxyError::OutlineUnreachable(format!("Outline answered {status} when checking the API key.")))
            }
        }
    }
}

/// `{"data":{"user":{"id","name","email"}}}` → the user.
fn parse_auth_info(body: &str) -> Option<User> {
    let value: Value = serde_json::from_str(body).ok()?;
    let user = value.get("data")?.get("user")?;
    let field = |k: &str| user.get(k).and_then(Value::as_str).unwrap_or("").to_string();
    let id = field("id");
    if id.is_empty() {
        return None;
    }
    Some(User { name: field("name"), email: field("email"), id })
}

/// A ureq error in words, never with a header (so never with a key).
fn describe_ureq_error(e: &ureq::Error) -> String {
    match e {
        ureq::Error::Timeout(t) => format!("timed out ({t:?})"),
        ureq::Error::Io(io) => format!("{}", io.kind()),
        ureq::Error::ConnectionFailed => "connection failed".into(),
        ureq::Error::HostNotFound => "host not found".into(),
        other => format!("{other}"),
    }
}

// ======================================================================================
// 4. Containers: the registry (one entry per container, behind one Mutex that is never
//    held across a docker or HTTP call) and the docker CLI that creates, starts, stops
//    and inspects them. One start per user: later requests wait on the first.
// ======================================================================================

const LABEL_MANAGED: &str = "outline-mcp-proxy.managed";
const LABEL_USER: &str = "outline-mcp-proxy.user";
const CONTAINER_USER: &str = "65534:65534";

#[derive(Clone, Copy, PartialEq, Eq, Debug)]
enum State {
    /// Not known to exist (a fresh entry, or removed).
    Missing,
    Stopped,
    Running,
    /// Believed to exist, state unknown (a start timed out, a connection failed).
    Unknown,
}

impl State {
    fn as_str(self) -> &'static str {
        match self {
            State::Missing => "missing",
            State::Stopped => "stopped",
            State::Running => "running",
            State::Unknown => "unknown",
        }
    }
}

type TransitionResult = Result<(), ProxyError>;

struct Entry {
    state: State,
    address: Option<SocketAddr>,
    user: String,
    created_at: Option<SystemTime>,
    last_used: SystemTime,
    idle_since: Instant,
    stopped_at: Option<SystemTime>,
    active: usize,
    websockets: usize,
    requests_total: u64,
    /// A start or stop under way; requests wait for it instead of racing it.
    transition: Option<Arc<Flight<TransitionResult>>>,
}

impl Entry {
    fn new(state: State) -> Entry {
        Entry {
            state,
            address: None,
            user: String::new(),
            created_at: None,
            last_used: SystemTime::now(),
            idle_since: Instant::now(),
            stopped_at: None,
            active: 0,
            websockets: 0,
            requests_total: 0,
            transition: None,
        }
    }

    fn is_idle_and_settled(&self) -> bool {
        self.active == 0 && self.transition.is_none()
    }
}

/// The proxy's shared state.
struct Proxy {
    cfg: Config,
    container_agent: ureq::Agent,
    ready_agent: ureq::Agent,
    outline_agent: ureq::Agent,
    registry: Mutex<HashMap<String, Entry>>,
    auth_cache: Mutex<HashMap<String, AuthSlot>>,
    auth_counters: AuthCounters,
    docker_status: Mutex<Result<(), String>>,
    stats_credentials: Option<String>,
    started: Instant,
    in_flight: AtomicUsize,
    /// Of those, event streams and WebSocket sessions: open-ended, so a SIGTERM does
    /// not wait for them (clients reconnect; MCP streams resume).
    long_lived: AtomicUsize,
    stopping: AtomicBool,
}

/// A request's hold on a running container: while any lease is alive the sleeper
/// leaves the container alone; dropping the last one starts its idle clock.
struct Lease {
    proxy: Arc<Proxy>,
    name: String,
    address: SocketAddr,
    websocket: bool,
}

impl Drop for Lease {
    fn drop(&mut self) {
        let mut registry = lock(&self.proxy.registry);
        if let Some(entry) = registry.get_mut(&self.name) {
            entry.active = entry.active.saturating_sub(1);
            if self.websocket {
                entry.websockets = entry.websockets.saturating_sub(1);
            }
            entry.last_used = SystemTime::now();
            entry.idle_since = Instant::now();
        }
    }
}

/// What to do for a request, decided under the registry lock.
enum Plan {
    Route(SocketAddr),
    Wait(Arc<Flight<TransitionResult>>),
    /// `known`: what the registry believed, so a wake or a create needs no inspect first.
    Start {
        flight: Arc<Flight<TransitionResult>>,
        evict: Option<String>,
        known: State,
    },
}

impl Proxy {
    fn new(cfg: Config) -> Proxy {
        let stats_credentials = cfg
            .stats_password
            .as_ref()
            .map(|p| format!("Basic {}", base64_encode(format!("{}:{}", cfg.stats_user, p).as_bytes())));
        Proxy {
            container_agent: container_agent(&cfg),
            ready_agent: ready_agent(),
            outline_agent: outline_agent(),
            registry: Mutex::new(HashMap::new()),
            auth_cache: Mutex::new(HashMap::new()),
            auth_counters: AuthCounters::default(),
            docker_status: Mutex::new(Ok(())),
            stats_credentials,
            started: Instant::now(),
            in_flight: AtomicUsize::new(0),
            long_lived: AtomicUsize::new(0),
            stopping: AtomicBool::new(false),
            cfg,
        }
    }

    /// A lease on the user's running container: routes to it when running, else
    /// waits for the start already under way, else starts it (one start per user).
    fn acquire(self: &Arc<Self>, name: &str, key: &str, user: &User, websocket: bool) -> Result<Lease, ProxyError> {
        let deadline = Instant::now() + self.cfg.start_timeout + Duration::from_secs(30);
        loop {
            if self.stopping.load(Ordering::SeqCst) {
                return Err(ProxyError::ShuttingDown);
            }
            match self.plan(name, user, websocket)? {
                Plan::Route(address) => {
                    return Ok(Lease { proxy: self.clone(), name: name.to_string(), address, websocket });
                }
                Plan::Wait(flight) => flight.wait()?,
                Plan::Start { flight, evict, known } => {
                    let result = self.start(name, key, user, evict, known);
                    self.finish_transition(name, &flight, result.clone());
                    result?;
                }
            }
            if Instant::now() > deadline {
                return Err(ProxyError::StartTimeout("The container did not settle in time.".into()));
            }
        }
    }

    /// Decides under the lock; never calls Docker.
    fn plan(&self, name: &str, user: &User, websocket: bool) -> Result<Plan, ProxyError> {
        let mut registry = lock(&self.registry);
        // counted only under a cap: no walk over every container on each request
        let at_cap = self.cfg.max_running > 0
            && registry.values().filter(|e| e.state == State::Running || e.transition.is_some()).count()
                >= self.cfg.max_running;
        let entry = registry.entry(name.to_string()).or_insert_with(|| Entry::new(State::Missing));
        if user.name != entry.user && !user.name.is_empty() {
            entry.user = user.name.clone();
        }
        if let Some(flight) = &entry.transition {
            return Ok(Plan::Wait(flight.clone()));
        }
        if let (State::Running, Some(address)) = (entry.state, entry.address) {
            entry.active += 1;
            entry.requests_total += 1;
            if websocket {
                entry.websockets += 1;
            }
            return Ok(Plan::Route(address));
        }
        let known = entry.state;
        let flight = Flight::new();
        entry.transition = Some(flight.clone());
        let mut evict = None;
        if at_cap {
            let victim = registry
                .iter()
                .filter(|(n, e)| *n != name && e.state == State::Running && e.is_idle_and_settled())
                .min_by_key(|(_, e)| e.idle_since)
                .map(|(n, _)| n.clone());
            match victim {
                Some(victim) => {
                    if let Some(v) = registry.get_mut(&victim) {
                        v.transition = Some(flight.clone());
                    }
                    evict = Some(victim);
                }
                None => {
                    if let Some(entry) = registry.get_mut(name) {
                        entry.transition = None;
                    }
                    flight.finish(Err(ProxyError::AtCapacity(self.cfg.max_running)));
                    return Err(ProxyError::AtCapacity(self.cfg.max_running));
                }
            }
        }
        Ok(Plan::Start { flight, evict, known })
    }

    /// Brings the container to running and ready, stopping `evict` first when the
    /// cap asks for room. Runs without the registry lock.
    fn start(&self, name: &str, key: &str, user: &User, evict: Option<String>, known: State) -> TransitionResult {
        if let Some(victim) = evict {
            log::info!("at MCP_PROXY_MAX_RUNNING={}: stopping least recently used {victim}", self.cfg.max_running);
            self.put_to_sleep(&victim);
        }
        let begun = Instant::now();
        // what the registry knows saves a docker call on the way (tens of ms): a known
        // stopped container is started, a never-seen one created; only when in doubt
        // (a failed connection, a failed start) is Docker asked first
        let how = match known {
            State::Stopped => self.wake_or_create(name, key, user)?,
            State::Missing => {
                self.docker_run(name, key, user)?;
                "created"
            }
            State::Running | State::Unknown => match self.inspect(name)? {
                None => {
                    self.docker_run(name, key, user)?;
                    "created"
                }
                Some(info) if info.running => "running",
                Some(_) => self.wake_or_create(name, key, user)?,
            },
        };
        let info = self
            .inspect(name)?
            .ok_or_else(|| ProxyError::ContainerFailed(format!("Container {name} vanished while starting.")))?;
        let address = match (info.address, info.restarting || !info.running) {
            (Some(ip), false) => SocketAddr::new(ip, self.cfg.container_port),
            (_, true) => {
                return Err(ProxyError::ContainerFailed(format!(
                    "Container {name} exited (code {}) as it started; see `docker logs {name}`.",
                    info.exit_code
                )))
            }
            (None, false) => {
                return Err(ProxyError::ContainerFailed(format!(
                    "Container {name} has no address on network {}.",
                    self.cfg.network
                )))
            }
        };
        {
            let mut registry = lock(&self.registry);
            if let Some(entry) = registry.get_mut(name) {
                entry.address = Some(address);
                entry.created_at = info.created_at.or(entry.created_at);
            }
        }
        self.wait_until_ready(name, address)?;
        if how != "running" {
            log::info!("container {name} {how} and ready in {}ms", begun.elapsed().as_millis());
            self.settle_cpus(name);
        }
        let mut registry = lock(&self.registry);
        if let Some(entry) = registry.get_mut(name) {
            entry.state = State::Running;
            entry.address = Some(address);
            entry.stopped_at = None;
        }
        Ok(())
    }

    fn finish_transition(&self, name: &str, flight: &Arc<Flight<TransitionResult>>, result: TransitionResult) {
        {
            let mut registry = lock(&self.registry);
            if let Some(entry) = registry.get_mut(name) {
                entry.transition = None;
                if let Err(e) = &result {
                    entry.state = match e {
                        ProxyError::DockerUnavailable(_) => entry.state,
                        _ => State::Unknown,
                    };
                }
            }
        }
        flight.finish(result);
    }

    /// Polls READY_PATH every 25 ms until it answers, the container exits, or
    /// START_TIMEOUT passes.
    fn wait_until_ready(&self, name: &str, address: SocketAddr) -> TransitionResult {
        let url = format!("http://{address}{}", self.cfg.ready_path);
        let deadline = Instant::now() + self.cfg.start_timeout;
        let mut last_exit_check = Instant::now();
        loop {
            if let Ok(response) = self.ready_agent.get(&url).call() {
                if response.status().as_u16() < 500 {
                    return Ok(());
                }
            }
            if Instant::now() >= deadline {
                return Err(ProxyError::StartTimeout(format!(
                    "Container {name} did not become ready within {}s.",
                    self.cfg.start_timeout.as_secs()
                )));
            }
            if last_exit_check.elapsed() > Duration::from_secs(1) {
                last_exit_check = Instant::now();
                if let Some(info) = self.inspect(name)? {
                    if !info.running && !info.restarting {
                        return Err(ProxyError::ContainerFailed(format!(
                            "Container {name} exited (code {}) before it was ready; see `docker logs {name}`.",
                            info.exit_code
                        )));
                    }
                }
            }
            thread::sleep(Duration::from_millis(25));
        }
    }

    /// After a boot with the burst, the steady CPU limit (off the request path).
    fn settle_cpus(&self, name: &str) {
        if !self.cfg.has_boot_burst() {
            return;
        }
        let cpus = self.cfg.cpus.to_string();
        let docker = self.cfg.docker.clone();
        let name = name.to_string();
        thread::spawn(move || {
            if let Err(e) = run_docker(&docker, &["update", "--cpus", &cpus, &name], None, DOCKER_SHORT) {
                log::warn!("could not lower the CPU limit of {name}: {}", e.message());
            }
        });
    }

    /// Before a stopped container's next wake, give it the boot burst back.
    fn arm_boot_burst(&self, name: &str) {
        if self.cfg.has_boot_burst() {
            let cpus = self.cfg.boot_cpus().to_string();
            if let Err(e) = run_docker(&self.cfg.docker, &["update", "--cpus", &cpus, name], None, DOCKER_SHORT) {
                log::warn!("could not raise the boot CPU limit of {name}: {}", e.message());
            }
        }
    }

    /// The `docker run` arguments: hardening, limits, labels; never the key.
    fn run_args(&self, name: &str, user: &User) -> Vec<String> {
        let c = &self.cfg;
        let memory = c.memory_bytes.to_string();
        let options: Vec<(&str, String)> = vec![
            ("--name", name.to_string()),
            ("--label", format!("{LABEL_MANAGED}=true")),
            ("--label", format!("{LABEL_USER}={}", sanitize_label(&user.name))),
            ("--restart", "unless-stopped".into()),
            ("--memory", memory.clone()),
            ("--memory-swap", memory),
            ("--cpus", c.boot_cpus().to_string()),
            ("--pids-limit", c.pids_limit.to_string()),
            ("--cap-drop", "ALL".into()),
            ("--security-opt", "no-new-privileges".into()),
            ("--tmpfs", "/tmp:rw,noexec,nosuid,size=64m,mode=1777".into()),
            ("--user", CONTAINER_USER.into()),
            ("--log-driver", "json-file".into()),
            ("--log-opt", "max-size=5m".into()),
            ("--log-opt", "max-file=2".into()),
            ("--network", c.network.clone()),
            ("--env", "HOME=/tmp".into()),
            ("--env", format!("OUTLINE_API_URL={}/api", c.container_outline_url)),
            ("--env", "MCP_TRANSPORT=streamable-http".into()),
            ("--env", "MCP_HOST=0.0.0.0".into()),
            ("--env", format!("MCP_PORT={}", c.container_port)),
        ];
        // --init: a real PID 1, so signals reach the server (a fast `docker stop`)
        // and zombies are reaped
        let mut args: Vec<String> = vec!["run".into(), "--detach".into(), "--init".into(), "--read-only".into()];
        for (flag, value) in options {
            args.push(flag.into());
            args.push(value);
        }
        if c.key_mode == KeyMode::Env {
            // the value comes from the docker CLI's own environment, not argv
            args.push("--env".into());
            args.push("OUTLINE_API_KEY".into());
        }
        args.push(c.image.clone());
        args
    }

    fn docker_run(&self, name: &str, key: &str, user: &User) -> TransitionResult {
        let args = self.run_args(name, user);
        let args: Vec<&str> = args.iter().map(String::as_str).collect();
        let env = match self.cfg.key_mode {
            KeyMode::Env => Some(("OUTLINE_API_KEY", key)),
            KeyMode::Header => None,
        };
        match run_docker(&self.cfg.docker, &args, env, DOCKER_LONG) {
            Ok(_) => Ok(()),
            // another proxy (or a previous life of this one) created it meanwhile
            Err(DockerError::Failed(msg)) if msg.contains("is already in use") => self.docker_start(name),
            Err(e) => Err(e.into_proxy_error(&format!("create container {name}"))),
        }
    }

    /// `docker start`, or `docker run` when it turns out to have been removed.
    fn wake_or_create(&self, name: &str, key: &str, user: &User) -> Result<&'static str, ProxyError> {
        match run_docker(&self.cfg.docker, &["start", name], None, DOCKER_LONG) {
            Ok(_) => Ok("woken"),
            Err(DockerError::Failed(msg)) if msg.contains("No such container") => {
                self.docker_run(name, key, user)?;
                Ok("created")
            }
            Err(e) => Err(e.into_proxy_error(&format!("start container {name}"))),
        }
    }

    fn docker_start(&self, name: &str) -> TransitionResult {
        run_docker(&self.cfg.docker, &["start", name], None, DOCKER_LONG)
            .map(|_| ())
            .map_err(|e| e.into_proxy_error(&format!("start container {name}")))
    }

    fn docker_stop(&self, name: &str) -> TransitionResult {
        run_docker(&self.cfg.docker, &["stop", "--time", "10", name], None, DOCKER_LONG)
            .map(|_| ())
            .map_err(|e| e.into_proxy_error(&format!("stop container {name}")))
    }

    /// The container as Docker sees it, or None when it does not exist.
    fn inspect(&self, name: &str) -> Result<Option<ContainerInfo>, ProxyError> {
        match run_docker(&self.cfg.docker, &["container", "inspect", name], None, DOCKER_SHORT) {
            Ok(out) => Ok(parse_inspect(&out, &self.cfg.network).into_iter().next()),
            Err(DockerError::Failed(msg)) if msg.to_ascii_lowercase().contains("no such") => Ok(None),
            Err(e) => Err(e.into_proxy_error(&format!("inspect container {name}"))),
        }
    }

    /// Rebuilds the registry from the labelled containers Docker knows (at start-up,
    /// and when Docker comes back), so a restarted proxy reuses every container.
    fn rediscover(&self) -> Result<usize, ProxyError> {
        let containers = list_managed_containers(&self.cfg)?;
        let mut registry = lock(&self.registry);
        for info in &containers {
            let entry = registry.entry(info.name.clone()).or_insert_with(|| Entry::new(State::Missing));
            if entry.transition.is_some() {
                continue;
            }
            entry.state = if info.running { State::Running } else { State::Stopped };
            entry.address = info.address.map(|ip| SocketAddr::new(ip, self.cfg.container_port));
            entry.created_at = info.created_at;
            entry.stopped_at = if info.running { None } else { info.finished_at };
            if entry.user.is_empty() {
                entry.user = info.user.clone();
            }
        }
        let known: Vec<&str> = containers.iter().map(|c| c.name.as_str()).collect();
        for (name, entry) in registry.iter_mut() {
            if !known.contains(&name.as_str()) && entry.transition.is_none() && entry.active == 0 {
                entry.state = State::Missing;
                entry.address = None;
            }
        }
        Ok(containers.len())
    }

    /// A connection to the container failed: forget what we believed about it, so
    /// the next acquire inspects it again.
    fn mark_unknown(&self, name: &str) {
        let mut registry = lock(&self.registry);
        if let Some(entry) = registry.get_mut(name) {
            if entry.transition.is_none() {
                entry.state = State::Unknown;
            }
        }
    }
}

/// What `docker inspect` says of one container.
#[derive(Debug, Clone)]
struct ContainerInfo {
    name: String,
    running: bool,
    restarting: bool,
    exit_code: i64,
    address: Option<std::net::IpAddr>,
    created_at: Option<SystemTime>,
    finished_at: Option<SystemTime>,
    user: String,
}

fn parse_inspect(json_text: &str, network: &str) -> Vec<ContainerInfo> {
    let Ok(Value::Array(items)) = serde_json::from_str::<Value>(json_text) else {
        return Vec::new();
    };
    items
        .iter()
        .map(|c| {
            let state = &c["State"];
            let address =
                c["NetworkSettings"]["Networks"][network]["IPAddress"].as_str().and_then(|ip| ip.parse().ok());
            ContainerInfo {
                name: c["Name"].as_str().unwrap_or("").trim_start_matches('/').to_string(),
                running: state["Running"].as_bool().unwrap_or(false),
                restarting: state["Restarting"].as_bool().unwrap_or(false),
                exit_code: state["ExitCode"].as_i64().unwrap_or(0),
                address,
                created_at: c["Created"].as_str().and_then(parse_rfc3339),
                finished_at: state["FinishedAt"].as_str().and_then(parse_rfc3339),
                user: c["Config"]["Labels"][LABEL_USER].as_str().unwrap_or("").to_string(),
            }
        })
        .collect()
}

fn list_managed_containers(cfg: &Config) -> Result<Vec<ContainerInfo>, ProxyError> {
    let filter = format!("label={LABEL_MANAGED}=true");
    let ids =
        run_docker(&cfg.docker, &["ps", "--all", "--quiet", "--no-trunc", "--filter", &filter], None, DOCKER_SHORT)
            .map_err(|e| e.into_proxy_error("list containers"))?;
    let ids: Vec<&str> = ids.split_whitespace().collect();
    if ids.is_empty() {
        return Ok(Vec::new());
    }
    let mut args = vec!["container", "inspect"];
    args.extend(ids);
    match run_docker(&cfg.docker, &args, None, DOCKER_SHORT) {
        // only this proxy's (its prefix): several proxies may share one Docker
        Ok(out) => {
            let all = parse_inspect(&out, &cfg.network);
            Ok(all.into_iter().filter(|c| c.name.starts_with(&cfg.prefix)).collect())
        }
        // one vanished between ps and inspect: the others are still printed
        Err(DockerError::Failed(msg)) if msg.to_ascii_lowercase().contains("no such") => Ok(Vec::new()),
        Err(e) => Err(e.into_proxy_error("inspect containers")),
    }
}

/// Label values come from Outline's user name: keep them printable and short.
fn sanitize_label(s: &str) -> String {
    s.chars().filter(|c| !c.is_control()).take(100).collect()
}

const DOCKER_SHORT: Duration = Duration::from_secs(15);
const DOCKER_LONG: Duration = Duration::from_secs(60);

#[derive(Debug)]
enum DockerError {
    /// The CLI is missing or the daemon does not answer.
    Unavailable(String),
    /// The daemon answered with an error.
    Failed(String),
}

impl DockerError {
    fn message(&self) -> &str {
        match self {
            DockerError::Unavailable(m) | DockerError::Failed(m) => m,
        }
    }

    fn into_proxy_error(self, what: &str) -> ProxyError {
        match self {
            DockerError::Unavailable(m) => {
                log::error!("docker unavailable ({what}): {m}");
                ProxyError::DockerUnavailable("Docker is not available on the proxy host.".into())
            }
            DockerError::Failed(m) => {
                log::error!("docker could not {what}: {m}");
                ProxyError::ContainerFailed(format!("Docker could not {what}: {}", first_line(&m)))
            }
        }
    }
}

fn first_line(s: &str) -> String {
    s.lines().next().unwrap_or("").chars().take(300).collect()
}

/// Runs the docker CLI with a time limit. `env` is the only way a secret reaches
/// it (env key mode): by the child's environment, never by its arguments.
fn run_docker(
    docker: &str,
    args: &[&str],
    env: Option<(&str, &str)>,
    timeout: Duration,
) -> Result<String, DockerError> {
    let mut command = Command::new(docker);
    command.args(args).stdin(Stdio::null()).stdout(Stdio::piped()).stderr(Stdio::piped());
    if let Some((name, value)) = env {
        command.env(name, value);
    }
    let mut child = command.spawn().map_err(|e| DockerError::Unavailable(format!("cannot run {docker}: {e}")))?;
    let stdout = child.stdout.take().map(|out| thread::spawn(move || read_all(out)));
    let stderr = child.stderr.take().map(|err| thread::spawn(move || read_all(err)));
    let deadline = Instant::now() + timeout;
    let mut pause = Duration::from_millis(1);
    let status = loop {
        match child.try_wait() {
            Ok(Some(status)) => break status,
            Ok(None) if Instant::now() < deadline => {
                thread::sleep(pause);
                pause = (pause * 2).min(Duration::from_millis(20));
            }
            Ok(None) => {
                let _ = child.kill();
                let _ = child.wait();
                return Err(DockerError::Unavailable(format!(
                    "`docker {}` took longer than {}s",
                    args[0],
                    timeout.as_secs()
                )));
            }
            Err(e) => return Err(DockerError::Unavailable(format!("waiting for docker: {e}"))),
        }
    };
    let out = stdout.and_then(|h| h.join().ok()).unwrap_or_default();
    let err = stderr.and_then(|h| h.join().ok()).unwrap_or_default();
    if status.success() {
        Ok(out)
    } else if is_daemon_unreachable(&err) {
        Err(DockerError::Unavailable(first_line(&err)))
    } else {
        Err(DockerError::Failed(err.trim().to_string()))
    }
}

fn read_all(mut source: impl Read) -> String {
    let mut buf = Vec::new();
    let _ = source.read_to_end(&mut buf);
    String::from_utf8_lossy(&buf).into_owned()
}

fn is_daemon_unreachable(stderr: &str) -> bool {
    let s = stderr.to_ascii_lowercase();
    s.contains("cannot connect to the docker daemon")
        || s.contains("is the docker daemon running")
        || s.contains("error during connect")
        || s.contains("connection refused")
        || s.contains("permission denied while trying to connect")
}

// ======================================================================================
// 5. Proxying: the request goes to the container as sent (less hop-by-hop headers,
//    plus the key header in header mode), both bodies stream, and a
//    text/event-stream answer reaches the client event by event. WebSocket upgrades
//    are relayed frame by frame.
// ======================================================================================

const HOP_BY_HOP: &[&str] = &[
    "connection",
    "keep-alive",
    "te",
    "trailer",
    "transfer-encoding",
    "upgrade",
    "proxy-connection",
    "proxy-authenticate",
    "proxy-authorization",
];

fn is_hop_by_hop(name: &str, connection_tokens: &[String]) -> bool {
    let lower = name.to_ascii_lowercase();
    HOP_BY_HOP.contains(&lower.as_str()) || lower.starts_with("proxy-") || connection_tokens.contains(&lower)
}

/// The headers the container gets: the client's, less hop-by-hop ones, the key
/// headers, Host and Expect; plus X-Forwarded-*, and the key in header mode.
fn upstream_request_headers(
    incoming: &Incoming,
    key: &str,
    key_mode: KeyMode,
    address: SocketAddr,
) -> Vec<(String, String)> {
    let connection = header_tokens(&incoming.headers, "connection");
    let key_from_authorization = incoming.header("x-outline-api-key").is_none();
    let mut out: Vec<(String, String)> = Vec::with_capacity(incoming.headers.len() + 4);
    for (name, value) in &incoming.headers {
        let lower = name.to_ascii_lowercase();
        let dropped = is_hop_by_hop(&lower, &connection)
            || matches!(lower.as_str(), "host" | "expect" | "x-outline-api-key" | "x-forwarded-for" | "content-length")
            || (lower == "authorization" && key_from_authorization);
        if !dropped {
            out.push((name.clone(), value.clone()));
        }
    }
    out.push(("Host".into(), address.to_string()));
    if let Some(host) = incoming.header("host") {
        if incoming.header("x-forwarded-host").is_none() {
            out.push(("X-Forwarded-Host".into(), host.to_string()));
        }
    }
    let client_ip = incoming.remote.map(|a| a.ip().to_string()).unwrap_or_else(|| "unknown".into());
    let forwarded_for = match incoming.header("x-forwarded-for") {
        Some(prior) => format!("{prior}, {client_ip}"),
        None => client_ip,
    };
    out.push(("X-Forwarded-For".into(), forwarded_for));
    if incoming.header("x-forwarded-proto").is_none() {
        out.push(("X-Forwarded-Proto".into(), "http".into()));
    }
    if key_mode == KeyMode::Header {
        out.push(("x-outline-api-key".into(), key.to_string()));
    }
    out
}

/// The headers the client gets back: the container's, less hop-by-hop ones and the
/// framing (which the proxy writes itself).
fn downstream_response_headers(headers: &ureq::http::HeaderMap) -> Vec<(String, String)> {
    let connection: Vec<String> = headers
        .get_all("connection")
        .iter()
        .filter_map(|v| v.to_str().ok())
        .flat_map(|v| v.split(','))
        .map(|t| t.trim().to_ascii_lowercase())
        .collect();
    headers
        .iter()
        .filter(|(name, _)| !is_hop_by_hop(name.as_str(), &connection) && name.as_str() != "content-length")
        .filter_map(|(name, value)| value.to_str().ok().map(|v| (name.as_str().to_string(), v.to_string())))
        .collect()
}

/// Reads the client's body for the container, counting it against MAX_BODY and
/// remembering why it failed (so a client fault is not blamed on the container).
struct BodyReader<'a> {
    inner: &'a mut dyn Read,
    read: u64,
    max: u64,
    fault: Option<ProxyError>,
}

impl Read for BodyReader<'_> {
    fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        match self.inner.read(buf) {
            Ok(n) => {
                self.read += n as u64;
                if self.read > self.max {
                    self.fault = Some(ProxyError::TooLarge(self.max));
                    return Err(io::Error::other("request body too large"));
                }
                Ok(n)
            }
            Err(e) => {
                self.fault = Some(match e.kind() {
                    io::ErrorKind::TimedOut | io::ErrorKind::WouldBlock => {
                        ProxyError::RequestTimeout("The request body stopped arriving.".into())
                    }
                    _ => ProxyError::BadRequest("The request body could not be read.".into()),
                });
                Err(e)
            }
        }
    }
}

fn proxy_http(
    proxy: &Arc<Proxy>,
    mut request: tiny_http::Request,
    incoming: &Incoming,
    key: &str,
    lease: &Lease,
) -> RouteResult {
    let has_body = incoming.header("transfer-encoding").is_some()
        || incoming.header("content-length").is_some_and(|v| v.trim() != "0");
    let socket = request.socket();
    let mut address = lease.address;
    let mut retried = false;
    let response = loop {
        let headers = upstream_request_headers(incoming, key, proxy.cfg.key_mode, address);
        let url = format!("http://{address}{}", incoming.target);
        let mut builder = ureq::http::Request::builder().method(incoming.method.as_str()).uri(&url);
        for (name, value) in &headers {
            builder = builder.header(name.as_str(), value.as_str());
        }
        if let Some(cl) = incoming.header("content-length") {
            builder = builder.header("Content-Length", cl.trim());
        }
        let mut body = BodyReader { inner: request.as_reader(), read: 0, max: proxy.cfg.max_body, fault: None };
        let result = match builder.body(()) {
            Err(_) => {
                return reject(request, ProxyError::BadRequest("The request cannot be forwarded as sent.".into()))
            }
            Ok(req) => {
                let (parts, ()) = req.into_parts();
                if has_body {
                    let req = ureq::http::Request::from_parts(parts, ureq::SendBody::from_reader(&mut body));
                    proxy.container_agent.run(req)
                } else {
                    proxy.container_agent.run(ureq::http::Request::from_parts(parts, ()))
                }
            }
        };
        let body_read = body.read;
        let fault = body.fault.take();
        match result {
            Ok(response) => break response,
            Err(e) => {
                if let Some(fault) = fault {
                    return reject(request, fault);
                }
                // no answer at all: refused, reset, or a kept-alive connection to a
                // container that has since died
                let never_answered = matches!(
                    e,
                    ureq::Error::ConnectionFailed | ureq::Error::Io(_) | ureq::Error::Timeout(ureq::Timeout::Connect)
                );
                if never_answered && !retried && body_read == 0 {
                    // the container moved or died since we last looked: look again (and
                    // start it if need be), then try once more; nothing of the client's
                    // body has been consumed, so the request can be sent again whole
                    retried = true;
                    proxy.mark_unknown(&lease.name);
                    let user = User { id: String::new(), name: String::new(), email: String::new() };
                    match proxy.acquire(&lease.name, key, &user, false) {
                        Ok(fresh) => {
                            address = fresh.address;
                            continue;
                        }
                        Err(err) => return reject(request, err),
                    }
                }
                if never_answered {
                    proxy.mark_unknown(&lease.name);
                }
                let err = match e {
                    ureq::Error::Timeout(ureq::Timeout::RecvResponse) => ProxyError::GatewayTimeout(format!(
                        "The container did not answer within {}s.",
                        proxy.cfg.response_timeout.as_secs()
                    )),
                    other => ProxyError::ContainerUnreachable(format!(
                        "The container could not be reached ({}).",
                        describe_ureq_error(&other)
                    )),
                };
                return reject(request, err);
            }
        }
    };
    let status = response.status().as_u16();
    stream_response(proxy, request, incoming, response, socket.as_deref()).map_err(|e| (None, e))?;
    Ok(status)
}

/// Writes the container's answer: its own length when it gave one, else chunked
/// (close-delimited for HTTP/1.0); flushed after every read, so events are not held.
fn stream_response(
    proxy: &Proxy,
    request: tiny_http::Request,
    incoming: &Incoming,
    response: ureq::http::Response<ureq::Body>,
    socket: Option<&TcpStream>,
) -> Result<(), ProxyError> {
    let status = response.status().as_u16();
    let mut headers = downstream_response_headers(response.headers());
    let is_event_stream = response
        .headers()
        .get("content-type")
        .and_then(|v| v.to_str().ok())
        .is_some_and(|v| v.to_ascii_lowercase().starts_with("text/event-stream"));
    let _long_lived = is_event_stream.then(|| InFlight::long_lived(proxy));
    if is_event_stream {
        headers.retain(|(n, _)| !n.eq_ignore_ascii_case("x-accel-buffering"));
        headers.push(("X-Accel-Buffering".into(), "no".into()));
        if !headers.iter().any(|(n, _)| n.eq_ignore_ascii_case("cache-control")) {
            headers.push(("Cache-Control".into(), "no-cache".into()));
        }
    }
    let content_length = response
        .headers()
        .get("content-length")
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.trim().parse::<u64>().ok());
    let no_body = incoming.method == "HEAD" || status == 204 || status == 304 || (100..200).contains(&status);
    let chunked = content_length.is_none() && !no_body && !incoming.http10;
    let close = incoming.wants_close || (content_length.is_none() && !no_body && incoming.http10);
    if close {
        request.close_connection();
    }
    let mut head = response_head(status, &headers, close);
    match content_length {
        Some(len) => head.push_str(&format!("Content-Length: {len}\r\n")),
        None if chunked => head.push_str("Transfer-Encoding: chunked\r\n"),
        None => {}
    }
    head.push_str("\r\n");
    let mut writer = request.into_writer();
    let client_gone = |_| ProxyError::BadRequest("The client went away.".into());
    writer.write_all(head.as_bytes()).map_err(client_gone)?;
    if no_body {
        return writer.flush().map_err(client_gone);
    }
    let mut body = response.into_body().into_reader();
    let mut buf = vec![0u8; 16 * 1024];
    loop {
        let n = match body.read(&mut buf) {
            Ok(0) => break,
            Ok(n) => n,
            Err(e) => {
                // the container broke off: end the client's answer unfinished, so it
                // knows, rather than as if it were complete
                log::warn!("container stream broke off: {}", e.kind());
                if let Some(s) = socket {
                    let _ = s.shutdown(Shutdown::Both);
                }
                return Err(ProxyError::ContainerUnreachable("The container's answer broke off.".into()));
            }
        };
        let written = if chunked {
            write!(writer, "{n:x}\r\n")
                .and_then(|_| writer.write_all(&buf[..n]))
                .and_then(|_| writer.write_all(b"\r\n"))
        } else {
            writer.write_all(&buf[..n])
        };
        written.and_then(|_| writer.flush()).map_err(client_gone)?;
    }
    if chunked {
        writer.write_all(b"0\r\n\r\n").map_err(client_gone)?;
    }
    // the head and any last bytes may still sit in the buffer (an empty body above)
    writer.flush().map_err(client_gone)?;
    if close {
        if let Some(s) = socket {
            let _ = s.shutdown(Shutdown::Write);
        }
    }
    Ok(())
}

/// What every HTTP client of the proxy shares: statuses are answers, not errors;
/// redirects are not followed; no proxy is taken from the environment (ureq reads
/// HTTP_PROXY by default).
fn agent_base() -> ureq::config::ConfigBuilder<ureq::typestate::AgentScope> {
    ureq::Agent::config_builder().http_status_as_error(false).max_redirects(0).proxy(None)
}

/// To the containers: the client's headers as sent (no User-Agent, Accept or
/// Accept-Encoding added), any method, no limit on a streamed body.
fn container_agent(cfg: &Config) -> ureq::Agent {
    agent_base()
        .allow_non_standard_methods(true)
        .user_agent(ureq::config::AutoHeaderValue::None)
        .accept(ureq::config::AutoHeaderValue::None)
        .accept_encoding(ureq::config::AutoHeaderValue::None)
        .timeout_connect(Some(Duration::from_secs(5)))
        .timeout_send_request(Some(Duration::from_secs(30)))
        .timeout_per_write(Some(Duration::from_secs(60)))
        .timeout_recv_response(Some(cfg.response_timeout))
        // ureq's 128 KiB buffers each way, per connection, made 300 open streams
        // cost 100 MiB; MCP's headers are small and bodies stream through anyway
        .input_buffer_size(32 * 1024)
        .max_response_header_size(32 * 1024)
        .output_buffer_size(16 * 1024)
        .max_idle_connections_per_host(8)
        // below uvicorn's 5 s keep-alive, so a pooled connection is not one the
        // container is closing
        .max_idle_age(Duration::from_secs(4))
        .build()
        .new_agent()
}

/// The readiness probe: short, never pooled.
fn ready_agent() -> ureq::Agent {
    agent_base().timeout_global(Some(Duration::from_secs(2))).max_idle_connections(0).build().new_agent()
}

/// To Outline: HTTPS checked against the host's CA store (a company CA works).
fn outline_agent() -> ureq::Agent {
    agent_base()
        .https_only(false)
        .timeout_global(Some(Duration::from_secs(10)))
        .tls_config(ureq::tls::TlsConfig::builder().root_certs(ureq::tls::RootCerts::PlatformVerifier).build())
        .build()
        .new_agent()
}

/// Relays a WebSocket session: the handshake goes to the container with the
/// client's path, subprotocols and key header; the container's answer decides the
/// client's; then frames pass both ways unchanged, one thread a direction.
fn relay_websocket(
    proxy: &Arc<Proxy>,
    request: tiny_http::Request,
    incoming: &Incoming,
    key: &str,
    lease: &Lease,
) -> RouteResult {
    let Some(client_key) = incoming.header("sec-websocket-key").map(str::trim).map(str::to_string) else {
        return reject(request, ProxyError::BadRequest("A WebSocket upgrade needs Sec-WebSocket-Key.".into()));
    };
    let upstream = match TcpStream::connect_timeout(&lease.address, Duration::from_secs(5)) {
        Ok(s) => s,
        Err(e) => {
            proxy.mark_unknown(&lease.name);
            let reason = format!("The container could not be reached ({}).", e.kind());
            return reject(request, ProxyError::ContainerUnreachable(reason));
        }
    };
    let _ = upstream.set_nodelay(true);
    let handshake = websocket_handshake(incoming, key, proxy.cfg.key_mode, lease.address);
    let mut upstream_reader = match upstream.try_clone() {
        Ok(s) => BufReader::new(s),
        Err(e) => return reject(request, ProxyError::ContainerUnreachable(format!("socket: {e}"))),
    };
    let _ = upstream.set_read_timeout(Some(proxy.cfg.response_timeout));
    let head = (&upstream).write_all(handshake.as_bytes()).and_then(|_| read_response_head(&mut upstream_reader));
    let (status, headers) = match head {
        Ok(h) => h,
        Err(e) => {
            let reason = format!("The container broke off the WebSocket handshake ({}).", e.kind());
            return reject(request, ProxyError::ContainerUnreachable(reason));
        }
    };
    if status != 101 {
        // a refused upgrade: the container's status (and a short body) to the client
        let body = read_refusal_body(&mut upstream_reader, &headers);
        let kept: Vec<(String, String)> = headers
            .into_iter()
            .filter(|(n, _)| !is_hop_by_hop(n, &[]) && !n.eq_ignore_ascii_case("content-length"))
            .collect();
        let _ = send_body(request, incoming, status, &kept, &body, true);
        return Ok(status);
    }
    let expected = tungstenite::handshake::derive_accept_key(client_key.as_bytes());
    if header_value(&headers, "sec-websocket-accept").map(str::trim) != Some(expected.as_str()) {
        let reason = "The container's WebSocket handshake was not valid.".to_string();
        return reject(request, ProxyError::ContainerUnreachable(reason));
    }
    let Some(client_socket) = request.socket() else {
        return reject(request, ProxyError::BadRequest("WebSockets need a TCP connection.".into()));
    };
    let (client_reader, mut client_writer) = request.into_reader_writer();
    let mut head = String::from("HTTP/1.1 101 Switching Protocols\r\n");
    for (name, value) in &headers {
        head.push_str(&format!("{name}: {value}\r\n"));
    }
    head.push_str("\r\n");
    if client_writer.write_all(head.as_bytes()).and_then(|_| client_writer.flush()).is_err() {
        return Ok(101);
    }
    // from here on a session may idle for hours: no read timeouts, blocking reads
    let _ = client_socket.set_read_timeout(None);
    let _ = upstream.set_read_timeout(None);
    log::info!("websocket session opened to {}", lease.name);
    let _long_lived = InFlight::long_lived(proxy);
    let (Ok(client_for_thread), Ok(upstream_for_thread), Ok(upstream_writer)) =
        (client_socket.try_clone(), upstream.try_clone(), upstream.try_clone())
    else {
        end_session(&client_socket, &upstream);
        return Ok(101);
    };
    let to_container = thread::Builder::new().name("ws-up".into()).spawn(move || {
        let result = relay_frames(client_reader, upstream_writer, true);
        end_session(&client_for_thread, &upstream_for_thread);
        result
    });
    let from_container = relay_frames(upstream_reader, client_writer, false);
    end_session(&client_socket, &upstream);
    let to_container = match to_container {
        Ok(handle) => handle.join().unwrap_or(Ok(0)),
        Err(_) => Ok(0),
    };
    log::info!(
        "websocket session to {} closed: {} frames up, {} down",
        lease.name,
        to_container.as_ref().map(|n| n.to_string()).unwrap_or_else(|e| e.to_string()),
        from_container.as_ref().map(|n| n.to_string()).unwrap_or_else(|e| e.to_string()),
    );
    Ok(101)
}

/// Shuts both sockets of a session, which wakes the relay thread blocked reading
/// the other one: one side gone ends the whole session at once.
fn end_session(client: &TcpStream, upstream: &TcpStream) {
    let _ = client.shutdown(Shutdown::Both);
    let _ = upstream.shutdown(Shutdown::Both);
}

/// The upgrade request for the container. The client's Sec-WebSocket-Key is passed
/// on, so the container's Sec-WebSocket-Accept is valid for the client too.
fn websocket_handshake(incoming: &Incoming, key: &str, key_mode: KeyMode, address: SocketAddr) -> String {
    let mut out = format!("GET {} HTTP/1.1\r\n", incoming.target);
    let mut headers = upstream_request_headers(incoming, key, key_mode, address);
    headers.push(("Connection".into(), "Upgrade".into()));
    headers.push(("Upgrade".into(), "websocket".into()));
    for (name, value) in headers {
        out.push_str(&format!("{name}: {value}\r\n"));
    }
    out.push_str("\r\n");
    out
}

/// Status and headers of an HTTP/1.1 response, read up to the blank line.
fn read_response_head(reader: &mut impl BufRead) -> io::Result<(u16, Vec<(String, String)>)> {
    let mut total = 0usize;
    let mut line = String::new();
    let mut read_line = |line: &mut String| -> io::Result<()> {
        line.clear();
        let n = reader.by_ref().take(8192).read_line(line)?;
        total += n;
        if n == 0 || total > 64 * 1024 {
            return Err(io::Error::new(io::ErrorKind::UnexpectedEof, "bad response head"));
        }
        Ok(())
    };
    read_line(&mut line)?;
    let status = line
        .split_whitespace()
        .nth(1)
        .and_then(|s| s.parse::<u16>().ok())
        .ok_or_else(|| io::Error::new(io::ErrorKind::InvalidData, "bad status line"))?;
    let mut headers = Vec::new();
    loop {
        read_line(&mut line)?;
        let trimmed = line.trim_end_matches(['\r', '\n']);
        if trimmed.is_empty() {
            break;
        }
        if let Some((name, value)) = trimmed.split_once(':') {
            headers.push((name.trim().to_string(), value.trim().to_string()));
        }
    }
    Ok((status, headers))
}

fn read_refusal_body(reader: &mut impl Read, headers: &[(String, String)]) -> Vec<u8> {
    let len =
        header_value(headers, "content-length").and_then(|v| v.trim().parse::<u64>().ok()).unwrap_or(0).min(64 * 1024);
    let mut body = Vec::new();
    let _ = reader.take(len).read_to_end(&mut body);
    body
}

/// Copies WebSocket frames from `reader` to `writer` unchanged, parsing each header
/// with tungstenite to find its end; flushes after every frame. Client frames must
/// be masked and container frames not (RFC 6455 §5.1). Returns the frame count.
fn relay_frames(mut reader: impl Read, mut writer: impl Write, from_client: bool) -> io::Result<u64> {
    use tungstenite::protocol::frame::FrameHeader;
    let mut frames = 0u64;
    let mut head = Vec::with_capacity(14);
    let mut buf = vec![0u8; 16 * 1024];
    loop {
        head.clear();
        let (header, payload_len) = loop {
            let mut byte = [0u8; 1];
            if reader.read(&mut byte)? == 0 {
                if head.is_empty() {
                    return Ok(frames);
                }
                return Err(io::Error::new(io::ErrorKind::UnexpectedEof, "WebSocket frame header cut short"));
            }
            head.push(byte[0]);
            let mut cursor = io::Cursor::new(&head);
            match FrameHeader::parse(&mut cursor) {
                Ok(Some(parsed)) => break parsed,
                Ok(None) if head.len() < 14 => continue,
                _ => return Err(io::Error::new(io::ErrorKind::InvalidData, "malformed WebSocket frame")),
            }
        };
        if header.mask.is_some() != from_client {
            return Err(io::Error::new(
                io::ErrorKind::InvalidData,
                "WebSocket frame masking is wrong for its direction",
            ));
        }
        writer.write_all(&head)?;
        let mut left = payload_len;
        while left > 0 {
            let want = left.min(buf.len() as u64) as usize;
            let n = reader.read(&mut buf[..want])?;
            if n == 0 {
                return Err(io::Error::new(io::ErrorKind::UnexpectedEof, "WebSocket frame cut short"));
            }
            writer.write_all(&buf[..n])?;
            left -= n as u64;
        }
        writer.flush()?;
        frames += 1;
    }
}

// ======================================================================================
// 6. The operator's endpoints: /health answers from memory (Docker's reachability is
//    refreshed in the background); /stats and /metrics give the same figures as JSON
//    and as Prometheus text, behind Basic auth when a password is set.
// ======================================================================================

fn health_endpoint(
    proxy: &Arc<Proxy>,
    request: tiny_http::Request,
    incoming: &Incoming,
    log_ctx: &mut LogContext,
) -> RouteResult {
    let (tracked, running) = {
        let registry = lock(&proxy.registry);
        (registry.len(), registry.values().filter(|e| e.state == State::Running).count())
    };
    let docker = lock(&proxy.docker_status).clone();
    let mut body = json!({
        "status": if docker.is_ok() { "healthy" } else { "unhealthy" },
        "containers_tracked": tracked,
        "containers_running": running,
        "docker": if docker.is_ok() { "ok" } else { "unreachable" },
    });
    if let Err(reason) = &docker {
        body["reason"] = json!(reason);
    }
    let has_key = incoming.header("x-outline-api-key").is_some() || incoming.header("authorization").is_some();
    if has_key {
        let (_, user, name) = match identify(proxy, incoming, log_ctx) {
            Ok(who) => who,
            Err(e) => return reject(request, e),
        };
        let state = lock(&proxy.registry).get(&name).map(|e| e.state).unwrap_or(State::Missing);
        body["user"] = json!({"id": user.id, "name": user.name, "email": user.email});
        body["container"] = json!({"name": name, "state": state.as_str()});
    }
    let status = if docker.is_ok() { 200 } else { 503 };
    send_json(request, incoming, status, &body, &[]);
    Ok(status)
}

fn stats_endpoint(
    proxy: &Arc<Proxy>,
    request: tiny_http::Request,
    incoming: &Incoming,
    prometheus: bool,
) -> RouteResult {
    if let Some(expected) = &proxy.stats_credentials {
        let given = incoming.header("authorization").unwrap_or("").trim();
        if !constant_time_eq(given.as_bytes(), expected.as_bytes()) {
            let headers = vec![
                ("Content-Type".to_string(), "application/json".to_string()),
                ("WWW-Authenticate".to_string(), "Basic realm=\"outline-mcp-proxy stats\"".to_string()),
            ];
            let body = json!({"error": "unauthorized", "message": "The statistics need the operator's credentials."});
            let _ = send_body(request, incoming, 401, &headers, body.to_string().as_bytes(), false);
            return Ok(401);
        }
    }
    let snapshot = proxy.snapshot();
    if prometheus {
        let headers = vec![("Content-Type".to_string(), "text/plain; version=0.0.4".to_string())];
        let _ = send_body(request, incoming, 200, &headers, render_metrics(&snapshot).as_bytes(), false);
    } else {
        send_json(request, incoming, 200, &render_stats(&snapshot), &[]);
    }
    Ok(200)
}

struct ContainerSnapshot {
    name: String,
    state: State,
    user: String,
    created_at: Option<SystemTime>,
    last_used: SystemTime,
    idle_seconds: u64,
    active: usize,
    websockets: usize,
    requests_total: u64,
    address: Option<SocketAddr>,
}

struct Snapshot {
    containers: Vec<ContainerSnapshot>,
    auth_hits: u64,
    auth_misses: u64,
    auth_failures: u64,
    outline_calls: u64,
    uptime: u64,
    docker_ok: bool,
}

impl Proxy {
    fn snapshot(&self) -> Snapshot {
        let mut containers: Vec<ContainerSnapshot> = lock(&self.registry)
            .iter()
            .map(|(name, e)| ContainerSnapshot {
                name: name.clone(),
                state: e.state,
                user: e.user.clone(),
                created_at: e.created_at,
                last_used: e.last_used,
                idle_seconds: if e.active > 0 { 0 } else { e.idle_since.elapsed().as_secs() },
                active: e.active,
                websockets: e.websockets,
                requests_total: e.requests_total,
                address: e.address,
            })
            .collect();
        containers.sort_by(|a, b| a.name.cmp(&b.name));
        Snapshot {
            containers,
            auth_hits: self.auth_counters.hits.load(Ordering::Relaxed),
            auth_misses: self.auth_counters.misses.load(Ordering::Relaxed),
            auth_failures: self.auth_counters.failures.load(Ordering::Relaxed),
            outline_calls: self.auth_counters.outline_calls.load(Ordering::Relaxed),
            uptime: self.started.elapsed().as_secs(),
            docker_ok: lock(&self.docker_status).is_ok(),
        }
    }
}

fn render_stats(s: &Snapshot) -> Value {
    let containers: Vec<Value> = s
        .containers
        .iter()
        .map(|c| {
            json!({
                "name": c.name,
                "state": c.state.as_str(),
                "user": c.user,
                "created_at": c.created_at.map(format_rfc3339),
                "last_used": format_rfc3339(c.last_used),
                "idle_seconds": c.idle_seconds,
                "active_requests": c.active,
                "websockets": c.websockets,
                "requests_total": c.requests_total,
                "address": c.address.map(|a| a.to_string()),
            })
        })
        .collect();
    json!({
        "total_containers": s.containers.len(),
        "running_count": s.containers.iter().filter(|c| c.state == State::Running).count(),
        "containers": containers,
        "auth": {"hits": s.auth_hits, "misses": s.auth_misses, "failures": s.auth_failures, "outline_calls": s.outline_calls},
        "docker": if s.docker_ok { "ok" } else { "unreachable" },
        "uptime_seconds": s.uptime,
    })
}

fn render_metrics(s: &Snapshot) -> String {
    let running = s.containers.iter().filter(|c| c.state == State::Running).count();
    let totals: [(&str, &str, &str, String); 8] = [
        ("mcp_proxy_containers_tracked", "gauge", "Containers the proxy knows.", s.containers.len().to_string()),
        ("mcp_proxy_containers_running", "gauge", "Containers running.", running.to_string()),
        ("mcp_proxy_docker_up", "gauge", "1 when the Docker daemon answers.", u8::from(s.docker_ok).to_string()),
        (
            "mcp_proxy_auth_cache_hits_total",
            "counter",
            "Requests answered from the key cache.",
            s.auth_hits.to_string(),
        ),
        (
            "mcp_proxy_auth_cache_misses_total",
            "counter",
            "Requests that needed Outline's verdict.",
            s.auth_misses.to_string(),
        ),
        (
            "mcp_proxy_auth_failures_total",
            "counter",
            "Requests refused or failed at authentication.",
            s.auth_failures.to_string(),
        ),
        ("mcp_proxy_outline_calls_total", "counter", "Calls made to Outline's auth.info.", s.outline_calls.to_string()),
        ("mcp_proxy_uptime_seconds", "gauge", "Seconds since the proxy started.", s.uptime.to_string()),
    ];
    type PerContainer = fn(&ContainerSnapshot) -> String;
    let per_container: [(&str, &str, &str, PerContainer); 5] = [
        ("mcp_proxy_container_up", "gauge", "1 when the container is running.", |c| {
            u8::from(c.state == State::Running).to_string()
        }),
        ("mcp_proxy_container_active_requests", "gauge", "Requests and streams in flight.", |c| c.active.to_string()),
        ("mcp_proxy_container_websockets", "gauge", "Open WebSocket sessions.", |c| c.websockets.to_string()),
        ("mcp_proxy_container_requests_total", "counter", "Requests routed to the container.", |c| {
            c.requests_total.to_string()
        }),
        ("mcp_proxy_container_idle_seconds", "gauge", "Seconds since the last request ended.", |c| {
            c.idle_seconds.to_string()
        }),
    ];
    let mut out = String::new();
    for (name, kind, help, value) in totals {
        out.push_str(&format!("# HELP {name} {help}\n# TYPE {name} {kind}\n{name} {value}\n"));
    }
    for (name, kind, help, value) in per_container {
        out.push_str(&format!("# HELP {name} {help}\n# TYPE {name} {kind}\n"));
        for c in &s.containers {
            out.push_str(&format!("{name}{{container=\"{}\"}} {}\n", c.name, value(c)));
        }
    }
    out
}

// ======================================================================================
// 7. Background work and the operator's commands: the sleeper stops idle containers
//    and removes long-stopped ones; the Docker watcher keeps /health's answer fresh;
//    `check` and `cleanup` are the seed's verify.sh and cleanup-docker.sh.
// ======================================================================================

impl Proxy {
    /// One pass of the sleeper: stop idle containers, remove long-stopped ones, drop
    /// expired cache entries.
    fn sweep(&self) {
        let now = Instant::now();
        let (to_stop, to_remove) = {
            let mut registry = lock(&self.registry);
            let mut to_stop = Vec::new();
            let mut to_remove = Vec::new();
            for (name, entry) in registry.iter_mut() {
                if !entry.is_idle_and_settled() {
                    continue;
                }
                let idle_for = now.saturating_duration_since(entry.idle_since);
                if matches!(entry.state, State::Running | State::Unknown) && idle_for >= self.cfg.idle_timeout {
                    let flight = Flight::new();
                    entry.transition = Some(flight.clone());
                    to_stop.push((name.clone(), flight));
                } else if let (State::Stopped, Some(after), Some(at)) =
                    (entry.state, self.cfg.remove_after, entry.stopped_at)
                {
                    if at.elapsed().unwrap_or_default() >= after {
                        let flight = Flight::new();
                        entry.transition = Some(flight.clone());
                        to_remove.push((name.clone(), flight));
                    }
                }
            }
            (to_stop, to_remove)
        };
        // stops run side by side: one slow container does not delay the others
        thread::scope(|scope| {
            for (name, flight) in &to_stop {
                scope.spawn(move || {
                    self.put_to_sleep(name);
                    flight.finish(Ok(()));
                });
            }
        });
        for (name, flight) in to_remove {
            let result = run_docker(&self.cfg.docker, &["rm", name.as_str()], None, DOCKER_LONG);
            let mut registry = lock(&self.registry);
            match result {
                Ok(_) => {
                    log::info!("removed container {name}, stopped longer than MCP_PROXY_REMOVE_AFTER");
                    registry.remove(&name);
                }
                Err(e) => {
                    log::warn!("could not remove {name}: {}", e.message());
                    if let Some(entry) = registry.get_mut(&name) {
                        entry.transition = None;
                    }
                }
            }
            drop(registry);
            flight.finish(Ok(()));
        }
        lock(&self.auth_cache).retain(|_, slot| match slot {
            AuthSlot::Known { until, .. } => *until > Instant::now(),
            AuthSlot::Asking(_) => true,
        });
    }

    /// Stops a container whose transition the caller holds, arms its boot burst for
    /// the next wake, and records the outcome (the caller finishes the flight). Used
    /// by the sleeper and by the cap's eviction alike.
    fn put_to_sleep(&self, name: &str) {
        let result = self.docker_stop(name);
        if result.is_ok() {
            log::info!("stopped idle container {name}");
            self.arm_boot_burst(name);
        }
        let gone = matches!(&result, Err(e) if e.message().contains("No such container"));
        let mut registry = lock(&self.registry);
        if let Some(entry) = registry.get_mut(name) {
            entry.transition = None;
            if result.is_ok() {
                entry.state = State::Stopped;
                entry.stopped_at = Some(SystemTime::now());
            } else if gone {
                // removed behind our back: nothing to stop, the next request creates it
                entry.state = State::Missing;
            }
        }
    }

    /// Asks Docker whether it answers; on its return, rebuilds the registry.
    fn watch_docker(&self) {
        let result = run_docker(&self.cfg.docker, &["version", "--format", "{{.Server.Version}}"], None, DOCKER_SHORT)
            .map(|_| ())
            .map_err(|e| first_line(e.message()));
        let was_ok = {
            let mut status = lock(&self.docker_status);
            let was_ok = status.is_ok();
            *status = result.clone();
            was_ok
        };
        match (was_ok, &result) {
            (true, Err(reason)) => log::error!("Docker stopped answering: {reason}"),
            (false, Ok(())) => {
                log::info!("Docker answers again; rebuilding the registry");
                if let Err(e) = self.rediscover() {
                    log::warn!("could not rebuild the registry: {}", e.message());
                }
            }
            _ => {}
        }
    }
}

fn spawn_background(proxy: &Arc<Proxy>) {
    let sleeper = proxy.clone();
    let _ = thread::Builder::new().name("sleeper".into()).spawn(move || loop {
        thread::sleep(sleeper.cfg.sweep_interval);
        sleeper.sweep();
    });
    let watcher = proxy.clone();
    let _ = thread::Builder::new().name("docker-watch".into()).spawn(move || loop {
        thread::sleep(Duration::from_secs(5));
        watcher.watch_docker();
    });
}

/// `serve`: rebuild the registry, start the background threads and the request
/// server, serve until SIGTERM, then let requests in flight finish (up to 30 s).
fn run_serve(cfg: Config) -> ExitCode {
    let proxy = Arc::new(Proxy::new(cfg));
    match proxy.rediscover() {
        Ok(n) => log::info!("found {n} existing container(s) of this proxy"),
        Err(e) => {
            log::error!("Docker is not available at start-up: {}", e.message());
            *lock(&proxy.docker_status) = Err("Docker did not answer at start-up".into());
        }
    }
    spawn_background(&proxy);
    let server = match start_server(&proxy) {
        Ok(server) => server,
        Err(e) => {
            log::error!("{e}");
            return ExitCode::FAILURE;
        }
    };
    // SIGTERM or SIGINT: new requests get 503, requests in flight get 30 s to finish;
    // open-ended streams and WebSocket sessions are cut at exit
    if signals::wait_for_term() {
        log::info!("SIGTERM: finishing requests in flight");
    }
    proxy.stopping.store(true, Ordering::SeqCst);
    drop(server);
    let deadline = Instant::now() + Duration::from_secs(30);
    let waiting = || proxy.in_flight.load(Ordering::SeqCst).saturating_sub(proxy.long_lived.load(Ordering::SeqCst));
    while waiting() > 0 && Instant::now() < deadline {
        thread::sleep(Duration::from_millis(20));
    }
    log::info!("stopped ({} request(s) and {} stream(s) cut)", waiting(), proxy.long_lived.load(Ordering::SeqCst));
    ExitCode::SUCCESS
}

/// `check`: each line a check, exit 1 when any fails.
fn run_check(cfg: &Config) -> ExitCode {
    let mut ok = true;
    let mut report = |passed: bool, what: String| {
        println!("{} {what}", if passed { "✓" } else { "✗" });
        ok &= passed;
    };
    report(true, format!("settings are valid (listen {}, key mode {:?})", cfg.listen, cfg.key_mode));
    let docker = run_docker(&cfg.docker, &["version", "--format", "{{.Server.Version}}"], None, DOCKER_SHORT);
    match &docker {
        Ok(v) => report(true, format!("Docker daemon answers (version {})", v.trim())),
        Err(e) => report(false, format!("Docker daemon does not answer: {}", first_line(e.message()))),
    }
    if docker.is_ok() {
        match run_docker(&cfg.docker, &["image", "inspect", "--format", "{{.Id}}", &cfg.image], None, DOCKER_SHORT) {
            Ok(_) => report(true, format!("image {} is present", cfg.image)),
            Err(_) => report(false, format!("image {} is missing: docker pull {}", cfg.image, cfg.image)),
        }
        match run_docker(
            &cfg.docker,
            &["network", "inspect", "--format", "{{.Name}}", &cfg.network],
            None,
            DOCKER_SHORT,
        ) {
            Ok(_) => report(true, format!("docker network {} exists", cfg.network)),
            Err(_) => report(false, format!("docker network {} does not exist", cfg.network)),
        }
        match list_managed_containers(cfg) {
            Ok(list) => report(
                true,
                format!(
                    "{} container(s) of this proxy, {} running",
                    list.len(),
                    list.iter().filter(|c| c.running).count()
                ),
            ),
            Err(e) => report(false, format!("cannot list containers: {}", e.message())),
        }
    }
    let proxy = Proxy::new(cfg.clone());
    match proxy.ask_outline("outline-mcp-proxy-check") {
        Err(ProxyError::Unauthorized(_)) => {
            report(true, format!("Outline answers at {}/api/auth.info", cfg.outline_url))
        }
        Ok(_) => report(false, "Outline accepted a made-up key: is OUTLINE_URL really Outline?".into()),
        Err(e) => report(false, format!("Outline at {} does not answer as expected: {}", cfg.outline_url, e.message())),
    }
    match std::net::TcpListener::bind(cfg.listen) {
        Ok(_) => report(true, format!("{} is free to listen on", cfg.listen)),
        Err(_) => match TcpStream::connect_timeout(&cfg.listen, Duration::from_secs(2)) {
            Ok(_) => report(true, format!("something (the proxy?) already listens on {}", cfg.listen)),
            Err(e) => report(false, format!("cannot listen on {}: {e}", cfg.listen)),
        },
    }
    if ok {
        println!("All checks passed.");
        ExitCode::SUCCESS
    } else {
        println!("Some checks failed.");
        ExitCode::FAILURE
    }
}

/// `cleanup`: remove this proxy's containers stopped longer than REMOVE_AFTER.
fn run_cleanup(cfg: &Config) -> ExitCode {
    let Some(after) = cfg.remove_after else {
        println!("MCP_PROXY_REMOVE_AFTER is 0: nothing is removed");
        return ExitCode::SUCCESS;
    };
    let containers = match list_managed_containers(cfg) {
        Ok(c) => c,
        Err(e) => {
            eprintln!("cannot list containers: {}", e.message());
            return ExitCode::FAILURE;
        }
    };
    let mut failed = false;
    let mut removed = 0;
    for c in containers.iter().filter(|c| !c.running && !c.restarting) {
        let stopped_for = c.finished_at.and_then(|t| t.elapsed().ok()).unwrap_or_default();
        if stopped_for < after {
            continue;
        }
        match run_docker(&cfg.docker, &["rm", &c.name], None, DOCKER_LONG) {
            Ok(_) => {
                removed += 1;
                println!("removed {} (stopped {}h ago)", c.name, stopped_for.as_secs() / 3600);
            }
            Err(e) => {
                failed = true;
                println!("could not remove {}: {}", c.name, first_line(e.message()));
            }
        }
    }
    println!("{removed} container(s) removed, {} kept", containers.len() - removed);
    if failed {
        ExitCode::FAILURE
    } else {
        ExitCode::SUCCESS
    }
}

fn main() -> ExitCode {
    let command = std::env::args().nth(1).unwrap_or_else(|| "serve".into());
    match command.as_str() {
        "--help" | "-h" | "help" => {
            print_help();
            return ExitCode::SUCCESS;
        }
        "--version" | "-V" | "version" => {
            println!("outline-mcp-proxy {}", env!("CARGO_PKG_VERSION"));
            return ExitCode::SUCCESS;
        }
        "serve" | "check" | "cleanup" => {}
        other => {
            eprintln!("unknown command {other:?}; see outline-mcp-proxy --help");
            return ExitCode::from(2);
        }
    }
    let cfg = match Config::load(&|name| std::env::var(name).ok()) {
        Ok(cfg) => cfg,
        Err(e) => {
            eprintln!("configuration error: {e}");
            return ExitCode::from(2);
        }
    };
    if command == "serve" {
        signals::block_term();
        // the HTTP client's own debug lines name URLs and headers: never below info
        let quiet = cfg.log_level.min(log::LevelFilter::Info);
        let logger = simple_logger::SimpleLogger::new()
            .with_level(cfg.log_level)
            .with_module_level("ureq", quiet)
            .with_module_level("ureq_proto", quiet)
            .with_module_level("rustls", quiet);
        if let Err(e) = logger.init() {
            eprintln!("cannot start logging: {e}");
        }
    }
    match command.as_str() {
        "check" => run_check(&cfg),
        "cleanup" => run_cleanup(&cfg),
        _ => run_serve(cfg),
    }
}

// ======================================================================================
// 8. Small helpers: lock recovery, time formats, base64, constant-time compare, and
//    the signal mask used for a graceful SIGTERM.
// ======================================================================================

/// A poisoned lock (a thread panicked holding it) still guards consistent data
/// here: every critical section is a few field updates. Carry on with it.
fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|e| e.into_inner())
}

fn constant_time_eq(a: &[u8], b: &[u8]) -> bool {
    let mut diff = (a.len() ^ b.len()) as u8 | u8::from(a.len() != b.len());
    for i in 0..a.len().max(b.len()) {
        diff |= a.get(i).copied().unwrap_or(0) ^ b.get(i).copied().unwrap_or(0);
    }
    diff == 0
}

fn base64_encode(input: &[u8]) -> String {
    const ALPHABET: &[u8; 64] = b"ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789+/";
    let mut out = String::with_capacity(input.len().div_ceil(3) * 4);
    for chunk in input.chunks(3) {
        let b = [chunk[0], *chunk.get(1).unwrap_or(&0), *chunk.get(2).unwrap_or(&0)];
        let n = (u32::from(b[0]) << 16) | (u32::from(b[1]) << 8) | u32::from(b[2]);
        for i in 0..4 {
            if i <= chunk.len() {
                out.push(ALPHABET[((n >> (18 - 6 * i)) & 63) as usize] as char);
            } else {
                out.push('=');
            }
        }
    }
    out
}

/// Days since 1970-01-01 of a civil date (Howard Hinnant's algorithm).
fn days_from_civil(y: i64, m: i64, d: i64) -> i64 {
    let y = if m <= 2 { y - 1 } else { y };
    let era = y.div_euclid(400);
    let yoe = y - era * 400;
    let doy = (153 * (m + if m > 2 { -3 } else { 9 }) + 2) / 5 + d - 1;
    let doe = yoe * 365 + yoe / 4 - yoe / 100 + doy;
    era * 146097 + doe - 719468
}

fn civil_from_days(z: i64) -> (i64, i64, i64) {
    let z = z + 719468;
    let era = z.div_euclid(146097);
    let doe = z - era * 146097;
    let yoe = (doe - doe / 1460 + doe / 36524 - doe / 146096) / 365;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let d = doy - (153 * mp + 2) / 5 + 1;
    let m = if mp < 10 { mp + 3 } else { mp - 9 };
    (yoe + era * 400 + i64::from(m <= 2), m, d)
}

/// `2026-11-25T12:06:45.123456789Z` (Docker's format) → time; Docker's zero time
/// (`0001-01-01T00:00:00Z`) → None.
fn parse_rfc3339(text: &str) -> Option<SystemTime> {
    let t = text.trim();
    let num = |range: std::ops::Range<usize>| t.get(range).and_then(|s| s.parse::<i64>().ok());
    let (y, mo, d, h, mi, s) = (num(0..4)?, num(5..7)?, num(8..10)?, num(11..13)?, num(14..16)?, num(17..19)?);
    if y < 1970 {
        return None;
    }
    let mut secs = days_from_civil(y, mo, d) * 86400 + h * 3600 + mi * 60 + s;
    let rest = t.get(19..)?;
    let rest = rest.trim_start_matches(|c: char| c == '.' || c.is_ascii_digit());
    if let Some(offset) = rest.get(1..).filter(|_| rest.starts_with('+') || rest.starts_with('-')) {
        let oh: i64 = offset.get(0..2)?.parse().ok()?;
        let om: i64 = offset.get(3..5)?.parse().ok()?;
        let sign = if rest.starts_with('+') { 1 } else { -1 };
        secs -= sign * (oh * 3600 + om * 60);
    }
    u64::try_from(secs).ok().map(|s| UNIX_EPOCH + Duration::from_secs(s))
}

fn format_rfc3339(t: SystemTime) -> String {
    let secs = t.duration_since(UNIX_EPOCH).map(|d| d.as_secs() as i64).unwrap_or(0);
    let (y, m, d) = civil_from_days(secs.div_euclid(86400));
    let rem = secs.rem_euclid(86400);
    format!("{y:04}-{m:02}-{d:02}T{:02}:{:02}:{:02}Z", rem / 3600, rem % 3600 / 60, rem % 60)
}

/// Graceful stop on SIGTERM/SIGINT without a signal crate: the signals are blocked
/// in every thread (the mask is set before any thread starts and is inherited), and
/// the main thread takes them with `sigwait`. Linux-only, through the C library std
/// already links.
mod signals {
    const SIGINT: i32 = 2;
    const SIGTERM: i32 = 15;
    const SIG_BLOCK: i32 = 0;

    /// glibc's sigset_t is 1024 bits.
    #[repr(C)]
    struct SigSet([u64; 16]);

    extern "C" {
        fn sigemptyset(set: *mut SigSet) -> i32;
        fn sigaddset(set: *mut SigSet, signum: i32) -> i32;
        fn pthread_sigmask(how: i32, set: *const SigSet, old: *mut SigSet) -> i32;
        fn sigwait(set: *const SigSet, sig: *mut i32) -> i32;
    }

    fn term_set() -> SigSet {
        let mut set = SigSet([0; 16]);
        // SAFETY: `set` is a valid, writable sigset_t-sized buffer.
        unsafe {
            sigemptyset(&mut set);
            sigaddset(&mut set, SIGTERM);
            sigaddset(&mut set, SIGINT);
        }
        set
    }

    /// Blocks SIGTERM and SIGINT in this thread and every thread it starts later.
    pub fn block_term() {
        let set = term_set();
        // SAFETY: valid set pointer; a null old-set pointer is allowed.
        unsafe {
            pthread_sigmask(SIG_BLOCK, &set, std::ptr::null_mut());
        }
    }

    /// Waits for SIGTERM or SIGINT; true when one came.
    pub fn wait_for_term() -> bool {
        let set = term_set();
        let mut sig = 0i32;
        // SAFETY: valid set and output pointers.
        let rc = unsafe { sigwait(&set, &mut sig) };
        rc == 0
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn env(pairs: &[(&str, &str)]) -> impl Fn(&str) -> Option<String> {
        let map: HashMap<String, String> = pairs.iter().map(|(k, v)| (k.to_string(), v.to_string())).collect();
        move |name| map.get(name).cloned()
    }

    fn incoming(headers: &[(&str, &str)]) -> Incoming {
        Incoming {
            method: "POST".into(),
            target: "/mcp?x=1".into(),
            path: "/mcp".into(),
            http10: false,
            headers: headers.iter().map(|(n, v)| (n.to_string(), v.to_string())).collect(),
            remote: Some("10.1.2.3:5555".parse().unwrap()),
            wants_close: false,
        }
    }

    #[test]
    fn defaults_match_the_design_card() {
        let cfg = Config::load(&env(&[])).unwrap();
        assert_eq!(cfg.listen, "127.0.0.1:8000".parse().unwrap());
        assert_eq!(cfg.outline_url, "https://app.getoutline.com");
        assert_eq!(cfg.container_outline_url, cfg.outline_url);
        assert_eq!(cfg.image, "ghcr.io/vortiago/mcp-outline:latest");
        assert_eq!(cfg.container_port, 3000);
        assert_eq!(cfg.ready_path, "/health");
        assert_eq!(cfg.prefix, "mcp-");
        assert_eq!(cfg.network, "bridge");
        assert_eq!(cfg.memory_bytes, 256 << 20);
        assert_eq!(cfg.cpus, 0.3);
        assert_eq!(cfg.pids_limit, 128);
        assert_eq!(cfg.key_mode, KeyMode::Header);
        assert_eq!(cfg.idle_timeout, Duration::from_secs(900));
        assert_eq!(cfg.sweep_interval, Duration::from_secs(60));
        assert_eq!(cfg.remove_after, Some(Duration::from_secs(7 * 86400)));
        assert_eq!(cfg.auth_ttl, Duration::from_secs(60));
        assert_eq!(cfg.auth_fail_ttl, Duration::from_secs(10));
        assert_eq!(cfg.start_timeout, Duration::from_secs(60));
        assert_eq!(cfg.max_running, 0);
        assert_eq!(cfg.max_body, 10 << 20);
        assert_eq!(cfg.stats_user, "admin");
        assert_eq!(cfg.stats_password, None);
        assert!(cfg.allowed_origins.is_empty());
        assert_eq!(cfg.docker, "docker");
    }

    #[test]
    fn bad_values_name_their_variable() {
        for (name, value) in [
            ("MCP_PROXY_IDLE_TIMEOUT", "15 minutes"),
            ("MCP_PROXY_MEMORY", "lots"),
            ("MCP_PROXY_CPUS", "-1"),
            ("MCP_PROXY_KEY_MODE", "file"),
            ("OUTLINE_URL", "ftp://x"),
            ("MCP_PROXY_LISTEN", "nowhere"),
            ("MCP_PROXY_CONTAINER_PORT", "70000"),
            ("MCP_PROXY_MAX_RUNNING", "many"),
            ("MCP_PROXY_CONTAINER_PREFIX", "-x"),
            ("MCP_PROXY_LOG", "loud"),
        ] {
            let err = Config::load(&env(&[(name, value)])).unwrap_err();
            assert!(err.contains(name), "{err}");
        }
    }

    #[test]
    fn outline_url_accepts_a_trailing_api() {
        let cfg = Config::load(&env(&[("OUTLINE_URL", "https://wiki.example.com/api/")])).unwrap();
        assert_eq!(cfg.outline_url, "https://wiki.example.com");
    }

    #[test]
    fn durations_and_sizes() {
        assert_eq!(parse_duration("90"), Some(Duration::from_secs(90)));
        assert_eq!(parse_duration("90s"), Some(Duration::from_secs(90)));
        assert_eq!(parse_duration("15m"), Some(Duration::from_secs(900)));
        assert_eq!(parse_duration("2h"), Some(Duration::from_secs(7200)));
        assert_eq!(parse_duration("7d"), Some(Duration::from_secs(604800)));
        assert_eq!(parse_duration("250ms"), Some(Duration::from_millis(250)));
        assert_eq!(parse_duration("0"), Some(Duration::ZERO));
        assert_eq!(parse_duration("m"), None);
        assert_eq!(parse_duration("5w"), None);
        assert_eq!(parse_duration("-5s"), None);
        assert_eq!(parse_size("256m"), Some(256 << 20));
        assert_eq!(parse_size("1g"), Some(1 << 30));
        assert_eq!(parse_size("1024"), Some(1024));
        assert_eq!(parse_size("10MB"), Some(10 << 20));
        assert_eq!(parse_size("x"), None);
        assert_eq!(parse_size("99999999999999999999g"), None);
    }

    #[test]
    fn keys_come_from_either_header_and_bad_ones_are_refused() {
        assert_eq!(extract_key(&incoming(&[("X-Outline-API-Key", "ol_api_abc")])).unwrap(), "ol_api_abc");
        assert_eq!(extract_key(&incoming(&[("Authorization", "Bearer ol_api_xyz")])).unwrap(), "ol_api_xyz");
        // the dedicated header wins over Authorization
        assert_eq!(
            extract_key(&incoming(&[("Authorization", "Bearer other"), ("x-outline-api-key", "mine")])).unwrap(),
            "mine"
        );
        for bad in ["", "has space", "caf\u{e9}", &"k".repeat(513)] {
            let err = extract_key(&incoming(&[("X-Outline-API-Key", bad)])).unwrap_err();
            assert_eq!(err.status(), 401, "{bad:?}");
        }
        assert_eq!(extract_key(&incoming(&[])).unwrap_err().status(), 401);
        assert_eq!(extract_key(&incoming(&[("Authorization", "Basic abc")])).unwrap_err().status(), 401);
        assert!(is_plausible_key(&"k".repeat(512)));
    }

    #[test]
    fn names_come_from_the_key_hash() {
        let h = key_hash("secret");
        assert_eq!(h, "2bb80d537b1da3e38bd30361aa855686bde0eacd7162fef6a25fe97bf527a25b");
        assert_eq!(container_name("mcp-", "secret"), "mcp-2bb80d537b1d");
    }

    #[test]
    fn requests_not_fit_to_forward_are_refused() {
        let ok = incoming(&[("Content-Length", "10"), ("X-Tab", "a\tb")]);
        assert!(check_request_form(&ok).is_ok());
        for headers in
            [vec![("X-Bad", "a\u{0}b")], vec![("X-Bad", "a\u{b}b")], vec![("Bad Name", "x")], vec![("", "x")]]
        {
            let err = check_request_form(&incoming(&headers)).unwrap_err();
            assert_eq!(err.status(), 400, "{headers:?}");
            assert!(err.closes_connection());
        }
        let mut star = incoming(&[]);
        star.target = "*".into();
        assert!(check_request_form(&star).is_err());
        let mut absolute = incoming(&[]);
        absolute.target = "http://evil/".into();
        assert!(check_request_form(&absolute).is_err());
    }

    #[test]
    fn hop_by_hop_headers_are_stripped_and_mcp_headers_kept() {
        let inc = incoming(&[
            ("Connection", "keep-alive, X-Private"),
            ("X-Private", "1"),
            ("Keep-Alive", "timeout=5"),
            ("TE", "trailers"),
            ("Proxy-Authorization", "x"),
            ("Mcp-Session-Id", "abc"),
            ("MCP-Protocol-Version", "2025-06-18"),
            ("Last-Event-ID", "7"),
            ("Accept", "application/json, text/event-stream"),
            ("Content-Type", "application/json"),
            ("X-Outline-API-Key", "client-key"),
            ("Host", "proxy.example.com"),
            ("X-Forwarded-For", "1.2.3.4"),
        ]);
        let addr: SocketAddr = "172.17.0.5:3000".parse().unwrap();
        let out = upstream_request_headers(&inc, "client-key", KeyMode::Header, addr);
        let names: Vec<String> = out.iter().map(|(n, _)| n.to_ascii_lowercase()).collect();
        for gone in ["connection", "x-private", "keep-alive", "te", "proxy-authorization"] {
            assert!(!names.contains(&gone.to_string()), "{gone} forwarded");
        }
        for kept in ["mcp-session-id", "mcp-protocol-version", "last-event-id", "accept", "content-type"] {
            assert!(names.contains(&kept.to_string()), "{kept} dropped");
        }
        assert_eq!(header_value(&out, "host"), Some("172.17.0.5:3000"));
        assert_eq!(header_value(&out, "x-forwarded-for"), Some("1.2.3.4, 10.1.2.3"));
        assert_eq!(header_value(&out, "x-forwarded-host"), Some("proxy.example.com"));
        assert_eq!(out.iter().filter(|(n, _)| n.eq_ignore_ascii_case("x-outline-api-key")).count(), 1);
        let env_mode = upstream_request_headers(&inc, "client-key", KeyMode::Env, addr);
        assert!(header_value(&env_mode, "x-outline-api-key").is_none());
        // a key sent as Bearer is not passed on as Authorization
        let bearer = incoming(&[("Authorization", "Bearer k")]);
        assert!(header_value(&upstream_request_headers(&bearer, "k", KeyMode::Env, addr), "authorization").is_none());
    }

    #[test]
    fn response_headers_lose_hop_by_hop_and_framing() {
        let mut map = ureq::http::HeaderMap::new();
        map.insert("connection", "close, x-secret".parse().unwrap());
        map.insert("x-secret", "1".parse().unwrap());
        map.insert("transfer-encoding", "chunked".parse().unwrap());
        map.insert("content-length", "5".parse().unwrap());
        map.insert("mcp-session-id", "s1".parse().unwrap());
        let out = downstream_response_headers(&map);
        assert_eq!(out, vec![("mcp-session-id".to_string(), "s1".to_string())]);
    }

    fn test_proxy(pairs: &[(&str, &str)]) -> Proxy {
        Proxy::new(Config::load(&env(pairs)).unwrap())
    }

    #[test]
    fn the_least_recently_used_idle_container_makes_room() {
        let proxy = test_proxy(&[("MCP_PROXY_MAX_RUNNING", "2")]);
        let addr: SocketAddr = "172.17.0.9:3000".parse().unwrap();
        {
            let mut reg = lock(&proxy.registry);
            let now = Instant::now();
            for (name, idle_secs, active) in [("mcp-old", 300, 0), ("mcp-busy", 900, 1)] {
                let mut e = Entry::new(State::Running);
                e.address = Some(addr);
                e.idle_since = now - Duration::from_secs(idle_secs);
                e.active = active;
                reg.insert(name.to_string(), e);
            }
        }
        let user = User { id: "u".into(), name: "U".into(), email: String::new() };
        match proxy.plan("mcp-new", &user, false).unwrap() {
            Plan::Start { evict, .. } => assert_eq!(evict.as_deref(), Some("mcp-old")),
            _ => panic!("expected a start"),
        }
        // with every running container busy, the cap refuses
        let proxy = test_proxy(&[("MCP_PROXY_MAX_RUNNING", "1")]);
        {
            let mut e = Entry::new(State::Running);
            e.address = Some(addr);
            e.active = 1;
            lock(&proxy.registry).insert("mcp-busy".into(), e);
        }
        let err = proxy.plan("mcp-new", &user, false).err().unwrap();
        assert_eq!(err.status(), 503);
        assert_eq!(err.retry_after(), Some(30));
    }

    #[test]
    fn running_containers_are_routed_and_counted() {
        let proxy = test_proxy(&[]);
        let addr: SocketAddr = "172.17.0.9:3000".parse().unwrap();
        let mut e = Entry::new(State::Running);
        e.address = Some(addr);
        lock(&proxy.registry).insert("mcp-a".into(), e);
        let user = User { id: "u".into(), name: "U".into(), email: String::new() };
        assert!(matches!(proxy.plan("mcp-a", &user, true).unwrap(), Plan::Route(a) if a == addr));
        let reg = lock(&proxy.registry);
        let entry = &reg["mcp-a"];
        assert_eq!((entry.active, entry.websockets, entry.requests_total), (1, 1, 1));
    }

    #[test]
    fn idle_selection_skips_busy_and_recent_containers() {
        let proxy = test_proxy(&[("MCP_PROXY_IDLE_TIMEOUT", "60s"), ("MCP_PROXY_DOCKER", "/bin/true")]);
        let now = Instant::now();
        for (name, idle_secs, active) in [("mcp-idle", 120, 0), ("mcp-busy", 120, 1), ("mcp-recent", 10, 0)] {
            let mut e = Entry::new(State::Running);
            e.idle_since = now - Duration::from_secs(idle_secs);
            e.active = active;
            lock(&proxy.registry).insert(name.to_string(), e);
        }
        proxy.sweep();
        let reg = lock(&proxy.registry);
        assert_eq!(reg["mcp-idle"].state, State::Stopped);
        assert_eq!(reg["mcp-busy"].state, State::Running);
        assert_eq!(reg["mcp-recent"].state, State::Running);
    }

    #[test]
    fn auth_info_answers_are_parsed() {
        let body = r#"{"ok":true,"data":{"user":{"id":"u1","name":"Ann","email":"a@x"},"team":{}}}"#;
        assert_eq!(parse_auth_info(body), Some(User { id: "u1".into(), name: "Ann".into(), email: "a@x".into() }));
        assert_eq!(parse_auth_info(r#"{"ok":true,"data":{}}"#), None);
        assert_eq!(parse_auth_info("not json"), None);
    }

    #[test]
    fn docker_inspect_is_read() {
        let text = r#"[{"Name":"/mcp-abc","Created":"2026-11-25T12:00:00.123456789Z",
            "State":{"Running":false,"Restarting":false,"ExitCode":137,"FinishedAt":"2026-11-25T13:00:00Z"},
            "Config":{"Labels":{"outline-mcp-proxy.user":"Ann"}},
            "NetworkSettings":{"Networks":{"bridge":{"IPAddress":"172.17.0.3"}}}}]"#;
        let info = &parse_inspect(text, "bridge")[0];
        assert_eq!(info.name, "mcp-abc");
        assert!(!info.running);
        assert_eq!(info.exit_code, 137);
        assert_eq!(info.address, Some("172.17.0.3".parse().unwrap()));
        assert_eq!(info.user, "Ann");
        assert_eq!(format_rfc3339(info.created_at.unwrap()), "2026-11-25T12:00:00Z");
        assert_eq!(format_rfc3339(info.finished_at.unwrap()), "2026-11-25T13:00:00Z");
        assert_eq!(parse_rfc3339("0001-01-01T00:00:00Z"), None);
        assert_eq!(format_rfc3339(parse_rfc3339("2024-02-29T23:59:59+01:00").unwrap()), "2024-02-29T22:59:59Z");
    }

    #[test]
    fn run_args_never_carry_the_key_and_harden_the_container() {
        for mode in ["header", "env"] {
            let proxy = test_proxy(&[("MCP_PROXY_KEY_MODE", mode)]);
            let user = User { id: "u".into(), name: "Ann".into(), email: String::new() };
            let args = proxy.run_args("mcp-x", &user).join(" ");
            for flag in [
                "--restart unless-stopped",
                "--memory 268435456",
                "--memory-swap 268435456",
                "--pids-limit 128",
                "--cap-drop ALL",
                "--security-opt no-new-privileges",
                "--read-only",
                "--user 65534:65534",
                "--label outline-mcp-proxy.managed=true",
            ] {
                assert!(args.contains(flag), "{flag} missing from {args}");
            }
            assert!(!args.contains("-p ") && !args.contains("--publish"));
            assert_eq!(args.contains("--env OUTLINE_API_KEY"), mode == "env");
            assert!(!args.contains("OUTLINE_API_KEY="));
        }
    }

    #[test]
    fn secrets_compare_in_constant_time_and_encode() {
        assert!(constant_time_eq(b"abc", b"abc"));
        assert!(!constant_time_eq(b"abc", b"abd"));
        assert!(!constant_time_eq(b"abc", b"abcd"));
        assert!(!constant_time_eq(b"", b"a"));
        assert_eq!(base64_encode(b"admin:pw"), "YWRtaW46cHc=");
        assert_eq!(base64_encode(b"ab"), "YWI=");
        assert_eq!(base64_encode(b"abc"), "YWJj");
    }

    #[test]
    fn websocket_frames_pass_unchanged_and_masking_is_checked() {
        // a masked client text frame "hi" and an unmasked server close frame 1000
        let client_frame = [0x81u8, 0x82, 1, 2, 3, 4, b'h' ^ 1, b'i' ^ 2];
        let mut out = Vec::new();
        assert_eq!(relay_frames(&client_frame[..], &mut out, true).unwrap(), 1);
        assert_eq!(out, client_frame);
        let close = [0x88u8, 0x02, 0x03, 0xe8];
        let mut out = Vec::new();
        assert_eq!(relay_frames(&close[..], &mut out, false).unwrap(), 1);
        assert_eq!(out, close);
        assert!(relay_frames(&close[..], &mut Vec::new(), true).is_err());
        // a frame cut short is an error, not a silent end
        assert!(relay_frames(&client_frame[..5], &mut Vec::new(), true).is_err());
    }

    #[test]
    fn metrics_render_every_container() {
        let proxy = test_proxy(&[]);
        lock(&proxy.registry).insert("mcp-a".into(), Entry::new(State::Running));
        let text = render_metrics(&proxy.snapshot());
        assert!(text.contains("mcp_proxy_containers_running 1"));
        assert!(text.contains("mcp_proxy_container_up{container=\"mcp-a\"} 1"));
        let stats = render_stats(&proxy.snapshot());
        assert_eq!(stats["total_containers"], 1);
        assert_eq!(stats["containers"][0]["state"], "running");
    }
}
