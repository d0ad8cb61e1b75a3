//! outline-mcp-proxy: one host, one Outline MCP server container per user.
//!
//! Each request carries the user's Outline API key. The proxy checks the key with
//! Outline (`POST {OUTLINE_URL}/api/auth.info`, cached by the key's sha256), starts or
//! wakes that user's own Docker container running `mcp-outline`, streams the request
//! to it and the answer back, and stops containers that have been idle too long.
//! Clients that cannot send a header (Claude's and ChatGPT's connector dialogs) sign in
//! with OAuth at `/oauth/mcp` instead: the proxy is their authorization server, and
//! their token opens the user's grant, which holds the Outline credential sealed.
//!
//! The file is a row of chapters (inline modules), in the order a request meets them;
//! each opens with what it owns and what it may call:
//!   config      every setting, its default and meaning; then `main` and `run_serve`
//!   error       the one error type: status, code, message, the JSON body
//!   wire        the wire: request form, headers, framing, the one writer of heads
//!   front       the front door: the listener, routing, the request's log line
//!   oauth       the OAuth resource /oauth/mcp: discovery, clients, authorize, tokens
//!   signin      the person's sign-in: the consent page, and Outline's own OAuth
//!   grants      clients, codes and grants: token hashes, credentials sealed at rest
//!   auth        the key from the request, and Outline's verdict on it (cached)
//!   protocol    an MCP POST parsed once: method, name, generation; 2026-07-28's checks
//!   sessions    the clients' MCP sessions, which outlive containers
//!   staged      which containers hold mcp-outline's unsaved staged edits; may they sleep
//!   registry    what the proxy knows of each container: plans, leases, sweeps (no I/O)
//!   docker      every docker CLI call, as named verbs with typed results
//!   memory      the containers' memory budget: its size, parent cgroup, usage, fit
//!   containers  bringing a user's container to ready, and putting it to sleep
//!   relay       HTTP streamed both ways: send, one retry, a session reopened, the answer
//!   modern      2026-07-28 by the proxy itself: server/discover, listen, results stamped
//!   reopen      the upstream MCP sessions the proxy opens (again) and closes for clients
//!   held        notification streams held open: never waking a container, nor dying with it
//!   websocket   the WebSocket handshake, then frames relayed unchanged
//!   upstream    the pooled client to the containers, and the headers each way
//!   ops         /health, /stats, /metrics; the `check`, `cleanup`, `set-budget` commands
//!   background  the sleeper, the Docker watcher and event follower, the spare keeper
//!   signals     SIGTERM and SIGINT, taken with sigwait
//!   util        lock recovery, single flights, constant-time compare, base64, time
//!
//! Keys are never logged, never put in a process argument or a file, and only their
//! sha256 is kept in memory beyond the request that carried them.
//!
//! Reading path (about 700 lines: an auditor's first hour). One request, in order:
//!   front::route                      the whole decision: admit, OAuth door, origin, who, relay
//!   auth::extract, auth::owner_id     the credential from the headers; whose container it is
//!   auth::Verifier::verify            Outline's verdict, cached by hash, one call per key
//!   registry::Registry::plan          under the lock: route, wait, wake, create or refuse
//!   containers::Containers::acquire   after the lock, the Docker work the plan chose
//!     (then bring_up and wake)
//!   docker::ContainerSpec::args       every flag a user's container runs with, in one place
//!   docker::Docker::run               the one place a docker process is spawned
//!   upstream::request_headers         what reaches the container: only the checked key
//!   relay::proxy_http                 the request streamed in, the answer streamed out
//!
//! For the OAuth door, then: oauth::serve, oauth::identify_by_token, grants::Store::open_with.
//! The README's Security section names, for each claim, the function that keeps it.

use std::process::ExitCode;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::Arc;
use std::thread;
use std::time::{Duration, Instant};

use config::Config;

mod config {
    //! Owns every setting: its default, its meaning (`--help`), and its check. Read from
    //! the environment once at start-up; a bad value stops start-up naming the variable.
    //! Calls `memory` (the budget's default) and std.
    use std::net::{SocketAddr, ToSocketAddrs};
    use std::time::Duration;

    /// (variable, default, meaning). `--help` prints this table; `Config::load` reads it.
    pub const SETTINGS: &[(&str, &str, &str)] = &[
        ("MCP_PROXY_LISTEN", "127.0.0.1:8000", "listen address"),
        ("OUTLINE_URL", "https://app.getoutline.com", "Outline base URL; keys are checked at {OUTLINE_URL}/api/auth.info (a trailing /api is accepted)"),
        ("MCP_PROXY_CONTAINER_OUTLINE_URL", "", "Outline URL given to containers as OUTLINE_API_URL ({url}/api); empty = OUTLINE_URL"),
        ("MCP_PROXY_IMAGE", "ghcr.io/vortiago/mcp-outline:latest", "container image"),
        ("MCP_PROXY_CONTAINER_PORT", "3000", "port the MCP server listens on inside the container"),
        ("MCP_PROXY_READY_PATH", "/health", "a GET here answering (status < 500) means the container is ready"),
        ("MCP_PROXY_CONTAINER_PREFIX", "mcp-", "container names are {prefix}{32 hex of sha256(Outline team and user)}"),
        ("MCP_PROXY_NETWORK", "outline-mcp-proxy", "docker network the containers join; created when missing as a bridge with inter-container traffic off (enable_icc=false), so containers cannot reach each other"),
        ("MCP_PROXY_MEMORY", "192m", "memory limit per container (swap is not allowed on top)"),
        ("MCP_PROXY_CPUS", "0.3", "CPU limit per container once it is ready"),
        ("MCP_PROXY_BOOT_CPUS", "1", "CPU limit while a container boots, brought down to MCP_PROXY_CPUS once ready (0 = no boot burst)"),
        ("MCP_PROXY_PIDS_LIMIT", "128", "process limit per container"),
        ("MCP_PROXY_KEY_MODE", "header", "header: the key reaches the container per request as x-outline-api-key and never Docker; env: OUTLINE_API_KEY is set in the container (older images)"),
        ("MCP_PROXY_IDLE_TIMEOUT", "5m", "a container with no MCP traffic this long sleeps (a request, a response still streaming, or a WebSocket keeps it awake; a client's open notification stream does not)"),
        ("MCP_PROXY_SPARES", "1", "booted, unassigned containers kept ready in header mode: a user without a running container takes one at once (0 = off; with spares on, an idle container is removed rather than stopped)"),
        ("MCP_PROXY_USER_MAX_INFLIGHT", "0", "0 = no limit; else a user's requests in flight and held notification streams together beyond it get 429 with Retry-After"),
        ("MCP_PROXY_USER_MAX_STREAMS", "16", "notification streams (GET, text/event-stream) the proxy holds open per user; one more gets 429 with Retry-After (0 = no limit)"),
        ("MCP_PROXY_SSE_KEEPALIVE", "15s", "comment keep-alives on a client's notification stream while the proxy holds it (its container asleep or gone); below nginx's proxy_read_timeout"),
        ("MCP_PROXY_SWEEP_INTERVAL", "60s", "how often the sleeper thread looks"),
        ("MCP_PROXY_REMOVE_AFTER", "7d", "remove containers stopped this long (0 = never)"),
        ("MCP_PROXY_STAGED_EDITS_TIMEOUT", "24h", "a container holding mcp-outline's staged edits (edit_document with save: false, not yet saved) is not put to sleep, removed or replaced for this long; then it sleeps, with a warning naming the user and the documents (0 = no such hold)"),
        ("MCP_PROXY_AUTH_TTL", "60s", "how long Outline's yes for a key is trusted (0 = ask on every request)"),
        ("MCP_PROXY_AUTH_FAIL_TTL", "10s", "how long Outline's no for a key is trusted"),
        ("MCP_PROXY_START_TIMEOUT", "60s", "longest wait for a container to become ready"),
        ("MCP_PROXY_RESPONSE_TIMEOUT", "300s", "longest wait for a container's response headers (504 beyond; counted by the socket in whole seconds, rounded up); a streamed body has no limit"),
        ("MCP_PROXY_HEADER_TIMEOUT", "30s", "a client silent this long while sending its request (or between requests) is disconnected"),
        ("MCP_PROXY_MAX_CONNECTIONS", "1500", "connections served at once; beyond it 503 with Retry-After before a thread is spent (1500 x 2 threads for WebSockets fits the unit's TasksMax=4096)"),
        ("MCP_PROXY_MAX_RUNNING", "0", "0 = no cap; else, at the cap, the least recently used idle container is stopped, or 503 with Retry-After"),
        ("MCP_PROXY_MAX_BODY", "10m", "largest request body (413 beyond)"),
        ("MCP_PROXY_STATS_USER", "admin", "user for /stats and /metrics"),
        ("MCP_PROXY_STATS_PASSWORD", "", "when set, /stats and /metrics demand it (HTTP Basic), besides nginx"),
        ("MCP_PROXY_ALLOWED_ORIGINS", "", "comma-separated browser origins allowed; any other Origin header gets 403"),
        ("MCP_PROXY_OAUTH_PATH", "/oauth/mcp", "the MCP resource for clients that sign in with OAuth (Claude's and ChatGPT's connector dialogs); its endpoints are under /oauth; /mcp and the root well-known paths advertise no OAuth (empty = no OAuth front door)"),
        ("MCP_PROXY_PUBLIC_URL", "", "https://host as clients reach the proxy, for OAuth's issuer and resource; empty = from each request's Host and X-Forwarded-Proto (nginx sets both)"),
        ("MCP_PROXY_STATE_DIR", "", "where OAuth grants survive restarts (token hashes and credentials sealed under keys derived from the tokens, mode 0600); empty = $STATE_DIRECTORY (systemd's StateDirectory), and without that grants are kept in memory only"),
        ("OUTLINE_OAUTH_CLIENT_ID", "", "an OAuth app made in Outline (Settings > Applications) with redirect URI https://HOST/oauth/callback: people sign in with their Outline account; unset = they paste an Outline API key on the proxy's sign-in page"),
        ("OUTLINE_OAUTH_CLIENT_SECRET", "", "that app's secret (put it in the env file, never on a command line)"),
        ("OUTLINE_OAUTH_SCOPE", "read write", "the scopes asked of Outline for that app"),
        ("MCP_PROXY_OAUTH_ACCESS_TTL", "1h", "life of the proxy's OAuth access tokens"),
        ("MCP_PROXY_OAUTH_REFRESH_TTL", "30d", "life of its refresh tokens (each use rotates them)"),
        ("MCP_PROXY_OAUTH_REGISTER_LIMIT", "20", "OAuth client registrations (RFC 7591) allowed per source address per hour"),
        ("MCP_PROXY_OAUTH_REGISTER_LIMIT_TOTAL", "100", "OAuth client registrations allowed per hour from all addresses together"),
        ("MCP_PROXY_OAUTH_SIGNINS_PER_ADDRESS", "20", "OAuth sign-ins in progress at once per source address (each lives at most ten minutes)"),
        ("MCP_PROXY_TRUSTED_PROXY", "127.0.0.1", "comma-separated addresses of reverse proxies (nginx) whose X-Real-IP names the client for per-address limits; from any other peer the peer's own address counts (an IPv6 address counts by its /64)"),
        ("MCP_PROXY_OAUTH_MAX_CLIENTS", "1000", "registered OAuth clients kept at most; when full, the oldest with no live grant is dropped for a new one, and with none to drop registration gets 503"),
        ("MCP_PROXY_OAUTH_CLIENT_DOCUMENTS", "public", "client ID metadata documents (an https client_id) are fetched from public addresses only; any: also from this host and private networks; off: not at all (registration only)"),
        ("MCP_PROXY_DOCKER", "docker", "the docker CLI to run"),
        ("MCP_PROXY_LOG", "info", "log level: error, warn, info, debug, trace"),
        ("MCP_PROXY_MEMORY_BUDGET", "auto", "memory all user containers may use together, held by the kernel on their parent cgroup; at it, a start or a spare first puts the least recently used idle container to sleep (503 with Retry-After when all are busy); auto = the host's memory less 640 MiB for the OS, Docker, nginx and the proxy; a size such as 1400m or 2g; 0 or off = no budget"),
        ("MCP_PROXY_CGROUP_PARENT", "outline_mcp_proxy", "with a budget, the containers' parent cgroup: /NAME under Docker's cgroupfs driver, NAME.slice under its systemd driver; its limit is set by `outline-mcp-proxy set-budget` (as root: the unit's ExecStartPre); letters, digits, _ and single inner - (a level of slices), not under the host's system, user, machine or init slices nor docker"),
    ];

    #[derive(Clone, Copy, PartialEq, Eq, Debug)]
    pub enum KeyMode {
        Header,
        Env,
    }

    #[derive(Clone, Debug)]
    pub struct Config {
        pub listen: SocketAddr,
        pub outline_url: String,
        pub container_outline_url: String,
        pub image: String,
        pub container_port: u16,
        pub ready_path: String,
        pub prefix: String,
        pub network: String,
        pub memory_bytes: u64,
        pub cpus: f64,
        pub boot_cpus: f64,
        pub pids_limit: u32,
        pub key_mode: KeyMode,
        pub idle_timeout: Duration,
        pub sse_keepalive: Duration,
        pub sweep_interval: Duration,
        pub remove_after: Option<Duration>,
        pub staged_edits_timeout: Duration,
        pub auth_ttl: Duration,
        pub auth_fail_ttl: Duration,
        pub start_timeout: Duration,
        pub response_timeout: Duration,
        pub header_timeout: Duration,
        pub max_connections: usize,
        pub spares: usize,
        pub user_max_inflight: usize,
        pub user_max_streams: usize,
        pub max_running: usize,
        pub max_body: u64,
        pub stats_user: String,
        pub stats_password: Option<String>,
        pub allowed_origins: Vec<String>,
        pub docker: String,
        pub log_level: log::LevelFilter,
        pub oauth: OAuthConfig,
        pub state_dir: Option<std::path::PathBuf>,
        pub trusted_proxies: Vec<std::net::IpAddr>,
        /// Bytes all user containers may use together (0 = no budget).
        pub memory_budget: u64,
        pub cgroup_parent: String,
    }

    /// The OAuth front door's settings (MCP_PROXY_OAUTH_*, MCP_PROXY_PUBLIC_URL,
    /// OUTLINE_OAUTH_*), parsed and checked together by `load_oauth`.
    #[derive(Clone, Debug)]
    pub struct OAuthConfig {
        /// Empty when the OAuth front door is off.
        pub path: String,
        pub public_url: Option<String>,
        pub outline_app: Option<OutlineOAuthApp>,
        pub access_ttl: Duration,
        pub refresh_ttl: Duration,
        pub register_limit: u32,
        pub register_limit_total: u32,
        pub signins_per_address: u32,
        pub max_clients: u32,
        pub client_documents: ClientDocuments,
    }

    /// Where client ID metadata documents may be fetched from.
    #[derive(Clone, Copy, PartialEq, Eq, Debug)]
    pub enum ClientDocuments {
        /// Public addresses only: a client_id URL cannot make the proxy fetch from this
        /// host, its private network, or the cloud's metadata service.
        Public,
        Any,
        Off,
    }

    /// The operator's OAuth app in Outline.
    #[derive(Clone)]
    pub struct OutlineOAuthApp {
        pub client_id: String,
        pub client_secret: String,
        pub scope: String,
    }

    /// Never prints the secret (Config is printed in debug logs and test failures).
    impl std::fmt::Debug for OutlineOAuthApp {
        fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
            f.debug_struct("OutlineOAuthApp").field("client_id", &self.client_id).finish_non_exhaustive()
        }
    }

    /// A configuration error names the variable and what is wrong with its value.
    fn bad_setting(name: &str, value: &str, expected: &str) -> String {
        format!("{name}={value:?} is not valid: expected {expected}")
    }

    impl Config {
        /// Reads every setting through `lookup` (the environment in production), falling
        /// back to the defaults of `SETTINGS`.
        pub fn load(lookup: &dyn Fn(&str) -> Option<String>) -> Result<Config, String> {
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

            let listen = listen_address(&get)?;
            let outline_url = normalize_outline_url("OUTLINE_URL", &get("OUTLINE_URL"))?;
            let container_outline_url = container_outline_url(&get, &outline_url)?;
            let image = image(&get)?;
            let container_port = container_port(&get)?;
            let ready_path = ready_path(&get)?;
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
                return Err(bad_setting(
                    "MCP_PROXY_MEMORY",
                    &get("MCP_PROXY_MEMORY"),
                    "at least 6m (Docker's minimum)",
                ));
            }
            let cpus_limit = cpus("MCP_PROXY_CPUS")?;
            if cpus_limit <= 0.0 {
                return Err(bad_setting("MCP_PROXY_CPUS", &get("MCP_PROXY_CPUS"), "more than 0"));
            }
            let pids_limit = positive_whole(&get, "MCP_PROXY_PIDS_LIMIT")?;
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
            let sse_keepalive = duration("MCP_PROXY_SSE_KEEPALIVE")?;
            if sse_keepalive.is_zero() {
                return Err(bad_setting("MCP_PROXY_SSE_KEEPALIVE", "0", "more than 0"));
            }
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
            let max_connections = number("MCP_PROXY_MAX_CONNECTIONS")? as usize;
            if max_connections == 0 {
                return Err(bad_setting("MCP_PROXY_MAX_CONNECTIONS", "0", "at least 1"));
            }
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
            let oauth = load_oauth(&get, &duration, key_mode)?;
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
                sse_keepalive,
                sweep_interval,
                remove_after: Some(remove_after).filter(|d| !d.is_zero()),
                staged_edits_timeout: duration("MCP_PROXY_STAGED_EDITS_TIMEOUT")?,
                auth_ttl: duration("MCP_PROXY_AUTH_TTL")?,
                auth_fail_ttl: duration("MCP_PROXY_AUTH_FAIL_TTL")?,
                start_timeout,
                response_timeout,
                header_timeout,
                max_connections,
                // spares hold no user's key: only in header mode
                spares: if key_mode == KeyMode::Header { number("MCP_PROXY_SPARES")? as usize } else { 0 },
                user_max_inflight: number("MCP_PROXY_USER_MAX_INFLIGHT")? as usize,
                user_max_streams: number("MCP_PROXY_USER_MAX_STREAMS")? as usize,
                max_running,
                max_body: size("MCP_PROXY_MAX_BODY")?,
                stats_user: get("MCP_PROXY_STATS_USER"),
                stats_password,
                allowed_origins,
                docker,
                log_level,
                oauth,
                state_dir: state_dir(&get)?,
                trusted_proxies: trusted_proxies(&get)?,
                memory_budget: memory_budget(&get, memory_bytes)?,
                cgroup_parent: cgroup_parent(&get)?,
            })
        }

        /// The CPU limit a container boots with: the burst when it is larger than the
        /// steady limit, else the steady limit.
        pub fn boot_cpus(&self) -> f64 {
            self.boot_cpus.max(self.cpus)
        }

        pub fn has_boot_burst(&self) -> bool {
            self.boot_cpus > self.cpus
        }
    }

    /// The OAuth front door's settings, checked together.
    fn load_oauth(
        get: &dyn Fn(&str) -> String,
        duration: &dyn Fn(&str) -> Result<Duration, String>,
        key_mode: KeyMode,
    ) -> Result<OAuthConfig, String> {
        let access_ttl = duration("MCP_PROXY_OAUTH_ACCESS_TTL")?;
        let refresh_ttl = duration("MCP_PROXY_OAUTH_REFRESH_TTL")?;
        if access_ttl.is_zero() || refresh_ttl < access_ttl {
            return Err(bad_setting(
                "MCP_PROXY_OAUTH_REFRESH_TTL",
                &get("MCP_PROXY_OAUTH_REFRESH_TTL"),
                "at least MCP_PROXY_OAUTH_ACCESS_TTL, which must be more than 0",
            ));
        }
        let client_documents = match get("MCP_PROXY_OAUTH_CLIENT_DOCUMENTS").trim() {
            "public" => ClientDocuments::Public,
            "any" => ClientDocuments::Any,
            "off" => ClientDocuments::Off,
            other => return Err(bad_setting("MCP_PROXY_OAUTH_CLIENT_DOCUMENTS", other, "public, any or off")),
        };
        Ok(OAuthConfig {
            path: oauth_path(get)?,
            public_url: public_url(get)?,
            outline_app: outline_app(get, key_mode)?,
            access_ttl,
            refresh_ttl,
            register_limit: positive_whole(get, "MCP_PROXY_OAUTH_REGISTER_LIMIT")?,
            register_limit_total: positive_whole(get, "MCP_PROXY_OAUTH_REGISTER_LIMIT_TOTAL")?,
            signins_per_address: positive_whole(get, "MCP_PROXY_OAUTH_SIGNINS_PER_ADDRESS")?,
            max_clients: positive_whole(get, "MCP_PROXY_OAUTH_MAX_CLIENTS")?,
            client_documents,
        })
    }

    /// MCP_PROXY_LISTEN: host:port, resolved.
    fn listen_address(get: &dyn Fn(&str) -> String) -> Result<SocketAddr, String> {
        let raw = get("MCP_PROXY_LISTEN");
        raw.to_socket_addrs()
            .ok()
            .and_then(|mut a| a.next())
            .ok_or_else(|| bad_setting("MCP_PROXY_LISTEN", &raw, "host:port"))
    }

    /// MCP_PROXY_CONTAINER_OUTLINE_URL, else OUTLINE_URL.
    fn container_outline_url(get: &dyn Fn(&str) -> String, outline_url: &str) -> Result<String, String> {
        let raw = get("MCP_PROXY_CONTAINER_OUTLINE_URL");
        if raw.trim().is_empty() {
            Ok(outline_url.to_string())
        } else {
            normalize_outline_url("MCP_PROXY_CONTAINER_OUTLINE_URL", &raw)
        }
    }

    /// MCP_PROXY_IMAGE: an image reference (never one docker would read as a flag).
    fn image(get: &dyn Fn(&str) -> String) -> Result<String, String> {
        let image = get("MCP_PROXY_IMAGE");
        if image.trim().is_empty() || image.starts_with('-') {
            return Err(bad_setting("MCP_PROXY_IMAGE", &image, "an image reference"));
        }
        Ok(image)
    }

    /// MCP_PROXY_CONTAINER_PORT: 1 to 65535.
    fn container_port(get: &dyn Fn(&str) -> String) -> Result<u16, String> {
        let raw = get("MCP_PROXY_CONTAINER_PORT");
        match raw.trim().parse::<u16>() {
            Ok(p) if p > 0 => Ok(p),
            _ => Err(bad_setting("MCP_PROXY_CONTAINER_PORT", &raw, "a port from 1 to 65535")),
        }
    }

    /// MCP_PROXY_READY_PATH: a path starting with `/`, without spaces or controls.
    fn ready_path(get: &dyn Fn(&str) -> String) -> Result<String, String> {
        let path = get("MCP_PROXY_READY_PATH");
        if !path.starts_with('/') || path.chars().any(|c| c.is_whitespace() || c.is_control()) {
            return Err(bad_setting("MCP_PROXY_READY_PATH", &path, "a path starting with /"));
        }
        Ok(path)
    }

    /// MCP_PROXY_MEMORY_BUDGET: auto (the host's memory less a reserve), a size, or 0/off.
    fn memory_budget(get: &dyn Fn(&str) -> String, per_container: u64) -> Result<u64, String> {
        let raw = get("MCP_PROXY_MEMORY_BUDGET");
        let asked = match raw.trim() {
            "auto" => None,
            "off" => Some(0),
            other => Some(parse_size(other).ok_or_else(|| {
                bad_setting("MCP_PROXY_MEMORY_BUDGET", &raw, "auto, a size such as 1400m or 2g, or off")
            })?),
        };
        crate::memory::size_budget(asked, per_container, crate::memory::host_memory())
            .map_err(|expected| bad_setting("MCP_PROXY_MEMORY_BUDGET", &raw, &expected))
    }

    /// MCP_PROXY_CGROUP_PARENT: a name for a cgroup and a systemd slice (no dots or slashes),
    /// of this proxy's own: not the host's own slices (`system`, `user`, `machine`, `init`,
    /// and anything under them) nor Docker's default parent, whose other processes would
    /// share the budget's limit (set by root) and skew what it reads.
    fn cgroup_parent(get: &dyn Fn(&str) -> String) -> Result<String, String> {
        const HOSTS_OWN: [&str; 5] = ["system", "user", "machine", "init", "docker"];
        let name = get("MCP_PROXY_CGROUP_PARENT").trim().to_string();
        let mut chars = name.chars();
        let valid = matches!(chars.next(), Some(c) if c.is_ascii_alphanumeric())
            && chars.all(|c| c.is_ascii_alphanumeric() || "-_".contains(c))
            && !name.contains("--")
            && !name.ends_with('-');
        let top = name.split('-').next().unwrap_or_default();
        match (valid, HOSTS_OWN.contains(&top)) {
            (true, false) => Ok(name),
            (true, true) => Err(bad_setting(
                "MCP_PROXY_CGROUP_PARENT",
                &name,
                "a parent of the proxy's own, not under the host's system, user, machine, init or docker",
            )),
            (false, _) => Err(bad_setting(
                "MCP_PROXY_CGROUP_PARENT",
                &name,
                "letters, digits, '_' and single inner '-' (a level of slices)",
            )),
        }
    }

    /// MCP_PROXY_TRUSTED_PROXY: the peers whose X-Real-IP is believed (empty = none).
    fn trusted_proxies(get: &dyn Fn(&str) -> String) -> Result<Vec<std::net::IpAddr>, String> {
        let raw = get("MCP_PROXY_TRUSTED_PROXY");
        raw.split(',')
            .map(str::trim)
            .filter(|a| !a.is_empty())
            .map(|a| {
                a.parse::<std::net::IpAddr>()
                    .map_err(|_| bad_setting("MCP_PROXY_TRUSTED_PROXY", &raw, "comma-separated IP addresses"))
            })
            .collect()
    }

    /// A setting that must be a whole number above 0.
    fn positive_whole(get: &dyn Fn(&str) -> String, name: &str) -> Result<u32, String> {
        let raw = get(name);
        match raw.trim().parse::<u32>() {
            Ok(n) if n > 0 => Ok(n),
            _ => Err(bad_setting(name, &raw, "a positive whole number")),
        }
    }

    /// MCP_PROXY_OAUTH_PATH: a path of its own (not /mcp, a well-known path or an endpoint).
    fn oauth_path(get: &dyn Fn(&str) -> String) -> Result<String, String> {
        let path = get("MCP_PROXY_OAUTH_PATH").trim().trim_end_matches('/').to_string();
        let endpoints = ["/oauth/register", "/oauth/authorize", "/oauth/callback", "/oauth/token", "/oauth/revoke"];
        let path_ok = path.is_empty()
            || (path.starts_with('/')
                && path != "/mcp"
                && !path.starts_with("/.well-known")
                && !endpoints.contains(&path.as_str())
                && path.bytes().all(|b| b.is_ascii_alphanumeric() || b"/-_.~".contains(&b)));
        if !path_ok {
            return Err(bad_setting("MCP_PROXY_OAUTH_PATH", &path, "a path such as /oauth/mcp (not /mcp), or empty"));
        }
        Ok(path)
    }

    /// MCP_PROXY_PUBLIC_URL: `https://host[:port]`, or unset.
    fn public_url(get: &dyn Fn(&str) -> String) -> Result<Option<String>, String> {
        let raw = get("MCP_PROXY_PUBLIC_URL");
        let public = raw.trim().trim_end_matches('/');
        if public.is_empty() {
            return Ok(None);
        }
        match public.strip_prefix("https://").or_else(|| public.strip_prefix("http://")) {
            Some(host) if !host.is_empty() && !host.contains(['/', '?', '#', ' ', '@']) => Ok(Some(public.to_string())),
            _ => Err(bad_setting("MCP_PROXY_PUBLIC_URL", &raw, "https://host[:port] without a path")),
        }
    }

    /// MCP_PROXY_STATE_DIR, else systemd's $STATE_DIRECTORY (its first entry), else none.
    fn state_dir(get: &dyn Fn(&str) -> String) -> Result<Option<std::path::PathBuf>, String> {
        let raw = get("MCP_PROXY_STATE_DIR");
        let dir = if raw.trim().is_empty() { get("STATE_DIRECTORY") } else { raw };
        let dir = dir.split(':').next().unwrap_or("").trim().to_string();
        if dir.is_empty() {
            Ok(None)
        } else if !dir.starts_with('/') || !std::path::Path::new(&dir).is_dir() {
            Err(bad_setting("MCP_PROXY_STATE_DIR", &dir, "an existing directory (an absolute path)"))
        } else {
            Ok(Some(std::path::PathBuf::from(dir)))
        }
    }

    /// OUTLINE_OAUTH_CLIENT_ID and _SECRET: both or neither, and not in `env` key mode
    /// (Outline's tokens change hourly; a container there holds one key).
    fn outline_app(get: &dyn Fn(&str) -> String, key_mode: KeyMode) -> Result<Option<OutlineOAuthApp>, String> {
        let (id, secret) = (get("OUTLINE_OAUTH_CLIENT_ID"), get("OUTLINE_OAUTH_CLIENT_SECRET"));
        let refuse = |why: &str| Err(bad_setting("OUTLINE_OAUTH_CLIENT_ID", id.trim(), why));
        match (id.trim(), secret.trim()) {
            ("", "") => Ok(None),
            ("", _) | (_, "") => refuse("set together with OUTLINE_OAUTH_CLIENT_SECRET (both or neither)"),
            _ if key_mode == KeyMode::Env => refuse("unset in MCP_PROXY_KEY_MODE=env (Outline's tokens change hourly)"),
            (id, secret) => Ok(Some(OutlineOAuthApp {
                client_id: id.to_string(),
                client_secret: secret.to_string(),
                scope: get("OUTLINE_OAUTH_SCOPE").trim().to_string(),
            })),
        }
    }

    /// `90`, `90s`, `15m`, `2h`, `7d` (and `250ms`).
    pub fn parse_duration(text: &str) -> Option<Duration> {
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
    pub fn parse_size(text: &str) -> Option<u64> {
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

    pub fn is_docker_name_safe(s: &str) -> bool {
        let mut chars = s.chars();
        matches!(chars.next(), Some(c) if c.is_ascii_alphanumeric())
            && chars.all(|c| c.is_ascii_alphanumeric() || "-_.".contains(c))
    }

    pub fn print_help() {
        println!(
            "outline-mcp-proxy {} — per-user Outline MCP containers behind one proxy\n\n\
             usage: outline-mcp-proxy [serve|check|cleanup|set-budget|--help|--version]\n\n\
             \x20 serve       run the proxy (default)\n\
             \x20 check       verify Docker, the image, Outline and the settings; exit 0 or 1\n\
             \x20 cleanup     remove this proxy's containers stopped longer than MCP_PROXY_REMOVE_AFTER\n\
             \x20 set-budget  as root: hold the containers' parent cgroup to MCP_PROXY_MEMORY_BUDGET\n\n\
             settings (environment variables, default in brackets):",
            env!("CARGO_PKG_VERSION")
        );
        for (name, default, meaning) in SETTINGS {
            println!("  {name} [{default}]\n      {meaning}");
        }
        println!("\ndurations: 90, 90s, 15m, 2h, 7d; sizes: 256m, 1g, bytes");
    }

    #[cfg(test)]
    mod tests {
        use super::*;
        use crate::tests::env;
        use std::time::Duration;

        #[test]
        fn defaults_are_the_cards_but_for_the_measured_ones() {
            let cfg = Config::load(&env(&[])).unwrap();
            assert_eq!(cfg.listen, "127.0.0.1:8000".parse().unwrap());
            assert_eq!(cfg.outline_url, "https://app.getoutline.com");
            assert_eq!(cfg.container_outline_url, cfg.outline_url);
            assert_eq!(cfg.image, "ghcr.io/vortiago/mcp-outline:latest");
            assert_eq!(cfg.container_port, 3000);
            assert_eq!(cfg.ready_path, "/health");
            assert_eq!(cfg.prefix, "mcp-");
            assert_eq!(cfg.network, "outline-mcp-proxy");
            assert_eq!(cfg.memory_bytes, 192 << 20);
            assert_eq!(cfg.cpus, 0.3);
            assert_eq!(cfg.pids_limit, 128);
            assert_eq!(cfg.key_mode, KeyMode::Header);
            assert_eq!(cfg.idle_timeout, Duration::from_secs(300));
            assert_eq!(cfg.sweep_interval, Duration::from_secs(60));
            assert_eq!(cfg.remove_after, Some(Duration::from_secs(7 * 86400)));
            assert_eq!(cfg.auth_ttl, Duration::from_secs(60));
            assert_eq!(cfg.auth_fail_ttl, Duration::from_secs(10));
            assert_eq!(cfg.start_timeout, Duration::from_secs(60));
            assert_eq!(cfg.max_running, 0);
            assert_eq!(cfg.max_connections, 1500);
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
        fn the_budget_setting_takes_sizes_auto_and_off() {
            let load = |value: &str| {
                let value = value.to_string();
                Config::load(&move |name| (name == "MCP_PROXY_MEMORY_BUDGET").then(|| value.clone()))
            };
            assert_eq!(load("400m").unwrap().memory_budget, 400 << 20);
            assert_eq!(load("1g").unwrap().memory_budget, 1 << 30);
            assert_eq!(load("off").unwrap().memory_budget, 0);
            assert_eq!(load("0").unwrap().memory_budget, 0);
            let host = crate::memory::host_memory().unwrap();
            // sysinfo's total is /proc/meminfo's MemTotal
            let meminfo = std::fs::read_to_string("/proc/meminfo").unwrap();
            let kib = meminfo.lines().find_map(|l| l.strip_prefix("MemTotal:")).unwrap().trim().trim_end_matches(" kB");
            assert_eq!(host, kib.parse::<u64>().unwrap() * 1024);
            let host = host & !4095;
            assert_eq!(load("auto").unwrap().memory_budget, host - crate::memory::RESERVE);
            assert_eq!(Config::load(&|_| None).unwrap().memory_budget, host - crate::memory::RESERVE);
            for nonsense in ["lots", "-1", "100m", "1000000g"] {
                let err = load(nonsense).unwrap_err();
                assert!(err.starts_with("MCP_PROXY_MEMORY_BUDGET="), "{nonsense}: {err}");
            }
            let parent = |v: &'static str| Config::load(&move |n| (n == "MCP_PROXY_CGROUP_PARENT").then(|| v.into()));
            assert_eq!(parent("omp-test_1").unwrap().cgroup_parent, "omp-test_1");
            assert!(parent("../etc").is_err() && parent("a.slice").is_err() && parent("").is_err());
            // the host's own slices and Docker's default parent; names systemd would refuse
            for shared in ["system", "user-1000", "machine", "init", "docker", "system-omp"] {
                assert!(parent(shared).unwrap_err().contains("of the proxy's own"), "{shared}");
            }
            for malformed in ["omp--x", "omp-", "-omp", "omp x"] {
                assert!(parent(malformed).unwrap_err().contains("single inner '-'"), "{malformed}");
            }
            assert_eq!(parent("users_omp").unwrap().cgroup_parent, "users_omp");
        }
    }
}

fn main() -> ExitCode {
    let command = std::env::args().nth(1).unwrap_or_else(|| "serve".into());
    match command.as_str() {
        "--help" | "-h" | "help" => {
            config::print_help();
            return ExitCode::SUCCESS;
        }
        "--version" | "-V" | "version" => {
            println!("outline-mcp-proxy {}", env!("CARGO_PKG_VERSION"));
            return ExitCode::SUCCESS;
        }
        "serve" | "check" | "cleanup" | "set-budget" => {}
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
        if let Err(e) = signals::block_term() {
            eprintln!("cannot take SIGTERM and SIGINT: {e}");
            return ExitCode::from(1);
        }
        start_logging(cfg.log_level);
    }
    match command.as_str() {
        "check" => ops::run_check(&cfg),
        "cleanup" => ops::run_cleanup(&cfg),
        "set-budget" => ops::run_set_budget(&cfg),
        _ => run_serve(cfg),
    }
}

/// The HTTP client's own debug lines name URLs and headers: never below info.
fn start_logging(level: log::LevelFilter) {
    let quiet = level.min(log::LevelFilter::Info);
    let logger = simple_logger::SimpleLogger::new()
        .with_level(level)
        .with_module_level("ureq", quiet)
        .with_module_level("ureq_proto", quiet)
        .with_module_level("rustls", quiet);
    if let Err(e) = logger.init() {
        eprintln!("cannot start logging: {e}");
    }
}

/// `serve`: rebuild the registry, start the background threads and the request
/// server, serve until SIGTERM, then let requests in flight finish (up to 30 s).
fn run_serve(cfg: Config) -> ExitCode {
    let session_key = match sessions::SessionKey::load_or_create(cfg.state_dir.as_deref()) {
        Ok(key) => key,
        Err(e) => {
            log::error!("session key: {e}");
            return ExitCode::FAILURE;
        }
    };
    let proxy = Arc::new(Proxy::new(cfg, session_key));
    background::adopt_existing(&proxy.containers);
    if let Err(e) = background::spawn(&proxy) {
        log::error!("{e}");
        return ExitCode::FAILURE;
    }
    let server = match front::start_server(&proxy) {
        Ok(server) => server,
        Err(e) => {
            log::error!("{e}");
            return ExitCode::FAILURE;
        }
    };
    // SIGTERM or SIGINT: new requests get 503, requests in flight get 30 s to finish;
    // open-ended streams and WebSocket sessions are cut at exit
    match signals::wait_for_term() {
        Ok(()) => log::info!("SIGTERM: finishing requests in flight"),
        Err(e) => log::error!("waiting for SIGTERM failed ({e}): stopping"),
    }
    proxy.life.stopping.store(true, Ordering::SeqCst);
    drop(server);
    let cut = proxy.life.drain(Duration::from_secs(30));
    if let Some(door) = &proxy.oauth {
        door.grants.save_at_stop();
    }
    log::info!("stopped ({cut} request(s) and {} stream(s) cut)", proxy.life.long_lived.load(Ordering::SeqCst));
    ExitCode::SUCCESS
}

/// The proxy's shared state: the chapters' parts, each behind its own lock.
pub struct Proxy {
    pub cfg: Config,
    pub auth: auth::Verifier,
    pub sessions: Arc<sessions::Sessions>,
    pub containers: containers::Containers,
    pub upstream: upstream::Upstream,
    /// The OAuth front door, unless MCP_PROXY_OAUTH_PATH is empty.
    pub oauth: Option<oauth::FrontDoor>,
    pub life: Life,
    /// MCP calls per method and per tool, for /metrics.
    pub calls: protocol::CallCounts,
    /// `Basic …` for /stats and /metrics, when a password is set.
    pub stats_credentials: Option<String>,
}

impl Proxy {
    pub fn new(cfg: Config, session_key: sessions::SessionKey) -> Proxy {
        let sessions = Arc::new(sessions::Sessions::new(session_key));
        Proxy {
            auth: auth::Verifier::new(&cfg),
            containers: containers::Containers::new(&cfg, sessions.clone()),
            sessions,
            upstream: upstream::Upstream::new(&cfg),
            oauth: (!cfg.oauth.path.is_empty()).then(|| oauth::FrontDoor::new(&cfg)),
            life: Life::default(),
            calls: protocol::CallCounts::default(),
            stats_credentials: ops::stats_credentials(&cfg),
            cfg,
        }
    }
}

/// The proxy's life: when it started, what is in flight, whether it is stopping.
pub struct Life {
    pub started: Instant,
    pub in_flight: AtomicUsize,
    /// Of those, event streams and WebSocket sessions: open-ended, so a SIGTERM does
    /// not wait for them (clients reconnect; MCP streams resume).
    pub long_lived: AtomicUsize,
    pub stopping: AtomicBool,
}

impl Default for Life {
    fn default() -> Life {
        Life {
            started: Instant::now(),
            in_flight: AtomicUsize::new(0),
            long_lived: AtomicUsize::new(0),
            stopping: AtomicBool::new(false),
        }
    }
}

impl Life {
    fn waiting(&self) -> usize {
        self.in_flight.load(Ordering::SeqCst).saturating_sub(self.long_lived.load(Ordering::SeqCst))
    }

    /// Waits up to `limit` for the requests in flight that are not open-ended; returns
    /// how many were still running.
    fn drain(&self, limit: Duration) -> usize {
        let deadline = Instant::now() + limit;
        while self.waiting() > 0 && Instant::now() < deadline {
            thread::sleep(Duration::from_millis(20));
        }
        self.waiting()
    }
}

/// Counts a request in flight (or, with `long_lived`, an open-ended one) while alive.
pub struct InFlight<'a>(&'a AtomicUsize);

impl<'a> InFlight<'a> {
    pub fn enter(life: &'a Life) -> InFlight<'a> {
        life.in_flight.fetch_add(1, Ordering::SeqCst);
        InFlight(&life.in_flight)
    }

    pub fn long_lived(life: &'a Life) -> InFlight<'a> {
        life.long_lived.fetch_add(1, Ordering::SeqCst);
        InFlight(&life.long_lived)
    }
}

impl Drop for InFlight<'_> {
    fn drop(&mut self) {
        self.0.fetch_sub(1, Ordering::SeqCst);
    }
}

mod error {
    //! Owns every way a request can fail: its status, code, message, and the JSON body
    //! and headers that carry it to the client. Calls nothing; `wire` writes it.
    use serde_json::json;

    #[derive(Clone, Debug)]
    pub enum ProxyError {
        BadRequest(String),
        /// No key, or one Outline refuses.
        Unauthorized(String),
        /// At the OAuth resource: no token or a bad one (message, `WWW-Authenticate` challenge).
        TokenRequired(String, String),
        /// /stats or /metrics without the operator's password.
        OperatorOnly,
        Forbidden(String),
        TooLarge(u64),
        RequestTimeout(String),
        OutlineUnreachable(String),
        ContainerUnreachable(String),
        DockerUnavailable(String),
        ContainerFailed(String),
        StartTimeout(String),
        AtCapacity(usize),
        /// One user's requests in flight reached MCP_PROXY_USER_MAX_INFLIGHT.
        UserBusy(usize),
        /// One user's held notification streams reached MCP_PROXY_USER_MAX_STREAMS.
        TooManyStreams(usize),
        /// An `Mcp-Session-Id` the proxy did not mint for this user (the client
        /// initializes again).
        UnknownSession,
        GatewayTimeout(String),
        ShuttingDown,
        /// Found by the HTTP library while reading a request (its status, its reason).
        Wire(u16, String),
    }

    impl ProxyError {
        pub fn status(&self) -> u16 {
            match self {
                ProxyError::BadRequest(_) => 400,
                ProxyError::Unauthorized(_) | ProxyError::TokenRequired(..) | ProxyError::OperatorOnly => 401,
                ProxyError::Forbidden(_) => 403,
                ProxyError::RequestTimeout(_) => 408,
                ProxyError::UserBusy(_) | ProxyError::TooManyStreams(_) => 429,
                ProxyError::UnknownSession => 404,
                ProxyError::TooLarge(_) => 413,
                ProxyError::OutlineUnreachable(_) | ProxyError::ContainerUnreachable(_) => 502,
                ProxyError::DockerUnavailable(_)
                | ProxyError::ContainerFailed(_)
                | ProxyError::StartTimeout(_)
                | ProxyError::AtCapacity(_)
                | ProxyError::ShuttingDown => 503,
                ProxyError::GatewayTimeout(_) => 504,
                ProxyError::Wire(status, _) => *status,
            }
        }

        pub fn code(&self) -> &'static str {
            match self {
                ProxyError::BadRequest(_) => "bad_request",
                ProxyError::Unauthorized(_) | ProxyError::TokenRequired(..) | ProxyError::OperatorOnly => {
                    "unauthorized"
                }
                ProxyError::Forbidden(_) => "forbidden",
                ProxyError::RequestTimeout(_) => "request_timeout",
                ProxyError::TooLarge(_) => "body_too_large",
                ProxyError::OutlineUnreachable(_) => "outline_unreachable",
                ProxyError::ContainerUnreachable(_) => "container_unreachable",
                ProxyError::DockerUnavailable(_) => "docker_unavailable",
                ProxyError::ContainerFailed(_) => "container_failed",
                ProxyError::StartTimeout(_) => "start_timeout",
                ProxyError::AtCapacity(_) => "at_capacity",
                ProxyError::UserBusy(_) => "too_many_requests",
                ProxyError::TooManyStreams(_) => "too_many_streams",
                ProxyError::UnknownSession => "session_not_found",
                ProxyError::GatewayTimeout(_) => "container_timeout",
                ProxyError::ShuttingDown => "shutting_down",
                ProxyError::Wire(status, _) => match status {
                    408 => "request_timeout",
                    417 => "expectation_failed",
                    431 => "headers_too_large",
                    503 => "too_many_connections",
                    505 => "http_version_not_supported",
                    _ => "bad_request",
                },
            }
        }

        pub fn message(&self) -> String {
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
                | ProxyError::GatewayTimeout(m)
                | ProxyError::TokenRequired(m, _)
                | ProxyError::Wire(_, m) => m.clone(),
                ProxyError::OperatorOnly => "The statistics need the operator's credentials.".into(),
                ProxyError::TooLarge(max) => {
                    format!("The request body is larger than the {max} bytes this proxy accepts.")
                }
                ProxyError::AtCapacity(max) => {
                    format!("All {max} container slots are busy with requests in flight; try again shortly.")
                }
                ProxyError::ShuttingDown => "The proxy is restarting; try again shortly.".into(),
                ProxyError::TooManyStreams(max) => format!(
                    "You have {max} notification streams open, as many as this proxy allows one user; close one first."
                ),
                ProxyError::UnknownSession => {
                    "This MCP session was not issued to you by this proxy, or has ended; initialize a new one.".into()
                }
                ProxyError::UserBusy(max) => {
                    format!(
                        "You have {max} requests in flight, as many as this proxy allows one user; try again shortly."
                    )
                }
            }
        }

        pub fn retry_after(&self) -> Option<u32> {
            match self {
                ProxyError::AtCapacity(_) => Some(30),
                ProxyError::UserBusy(_) => Some(1),
                ProxyError::TooManyStreams(_) => Some(5),
                ProxyError::DockerUnavailable(_)
                | ProxyError::StartTimeout(_)
                | ProxyError::ContainerFailed(_)
                | ProxyError::ShuttingDown => Some(10),
                _ => None,
            }
        }

        /// After these the rest of the request may still be on the wire: close the
        /// connection rather than read it as the next request.
        pub fn closes_connection(&self) -> bool {
            matches!(self, ProxyError::BadRequest(_) | ProxyError::TooLarge(_) | ProxyError::RequestTimeout(_))
        }

        /// The `WWW-Authenticate` challenge of a 401.
        fn challenge(&self) -> Option<String> {
            match self {
                ProxyError::Unauthorized(_) => Some("Bearer realm=\"outline-mcp-proxy\"".into()),
                ProxyError::TokenRequired(_, challenge) => Some(challenge.clone()),
                ProxyError::OperatorOnly => Some("Basic realm=\"outline-mcp-proxy stats\"".into()),
                _ => None,
            }
        }

        /// `{"error":"<code>","message":"<sentence for a person>"}`
        pub fn body(&self) -> Vec<u8> {
            json!({"error": self.code(), "message": self.message()}).to_string().into_bytes()
        }

        pub fn headers(&self) -> Vec<(String, String)> {
            let mut headers = vec![
                ("Content-Type".to_string(), "application/json".to_string()),
                ("Cache-Control".to_string(), "no-store".to_string()),
            ];
            if let Some(secs) = self.retry_after() {
                headers.push(("Retry-After".to_string(), secs.to_string()));
            }
            if let Some(challenge) = self.challenge() {
                headers.push(("WWW-Authenticate".to_string(), challenge));
            }
            headers
        }
    }

    #[cfg(test)]
    mod tests {
        use super::*;

        /// A header's value by name (the wire's `header_value`, which `error` may not call).
        fn header<'a>(headers: &'a [(String, String)], name: &str) -> Option<&'a str> {
            headers.iter().find(|(n, _)| n.eq_ignore_ascii_case(name)).map(|(_, v)| v.as_str())
        }

        #[test]
        fn one_error_body_and_the_right_challenge() {
            let err = ProxyError::Unauthorized("no key".into());
            let body: serde_json::Value = serde_json::from_slice(&err.body()).unwrap();
            assert_eq!(body, serde_json::json!({"error": "unauthorized", "message": "no key"}));
            let challenge = |e: &ProxyError| header(&e.headers(), "www-authenticate").map(str::to_string);
            assert!(challenge(&err).unwrap().starts_with("Bearer"));
            assert!(challenge(&ProxyError::OperatorOnly).unwrap().starts_with("Basic"));
            assert_eq!(challenge(&ProxyError::AtCapacity(2)), None);
            assert_eq!(header(&ProxyError::AtCapacity(2).headers(), "retry-after"), Some("30"));
        }
    }
}

mod wire {
    //! Owns the wire: a request as parsed, which address the client is (the one rule for
    //! X-Real-IP), which headers are hop-by-hop, how an answer's end is framed, and the
    //! one writer of response heads. Calls tiny_http, `error`.
    use crate::error::ProxyError;
    use std::io::{self, BufRead, Read, Write};
    use std::net::SocketAddr;

    /// Everything a handler needs from the request line and headers.
    pub struct Incoming {
        pub method: String,
        pub target: String,
        pub path: String,
        pub http10: bool,
        pub headers: Vec<(String, String)>,
        pub remote: Option<SocketAddr>,
        pub wants_close: bool,
    }

    impl Incoming {
        pub fn from(request: &tiny_http::Request) -> Incoming {
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

        pub fn header(&self, name: &str) -> Option<&str> {
            header_value(&self.headers, name)
        }

        /// The same request at another target (the OAuth resource, as the container's /mcp).
        pub fn with_target(&self, target: &str) -> Incoming {
            Incoming {
                method: self.method.clone(),
                target: target.to_string(),
                path: target.split('?').next().unwrap_or("").to_string(),
                http10: self.http10,
                headers: self.headers.clone(),
                remote: self.remote,
                wants_close: self.wants_close,
            }
        }

        pub fn is_websocket_upgrade(&self) -> bool {
            self.header("upgrade").is_some_and(|u| u.trim().eq_ignore_ascii_case("websocket"))
                && header_tokens(&self.headers, "connection").iter().any(|t| t == "upgrade")
        }

        /// A body follows the head (chunked, or a length other than 0).
        pub fn has_body(&self) -> bool {
            self.header("transfer-encoding").is_some() || self.header("content-length").is_some_and(|v| v.trim() != "0")
        }

        pub fn declared_length(&self) -> Option<u64> {
            self.header("content-length").and_then(|v| v.trim().parse::<u64>().ok())
        }
    }

    /// The address a request counts against in every per-address limit: an IPv4
    /// address, or an IPv6 address's /64 (one host is usually given a whole /64).
    #[derive(Clone, Copy, PartialEq, Eq, Hash, Debug)]
    pub struct Source(std::net::IpAddr);

    impl Source {
        fn of(ip: std::net::IpAddr) -> Source {
            use std::net::{IpAddr, Ipv6Addr};
            match unmapped(ip) {
                IpAddr::V6(v6) => {
                    let s = v6.segments();
                    Source(IpAddr::V6(Ipv6Addr::new(s[0], s[1], s[2], s[3], 0, 0, 0, 0)))
                }
                v4 => Source(v4),
            }
        }
    }

    /// An IPv4 address written as IPv6 (`::ffff:a.b.c.d`, as a dual-stack socket sees it) as IPv4.
    fn unmapped(ip: std::net::IpAddr) -> std::net::IpAddr {
        match ip {
            std::net::IpAddr::V6(v6) => v6.to_ipv4_mapped().map(std::net::IpAddr::V4).unwrap_or(ip),
            v4 => v4,
        }
    }

    /// Which address the client is, the one decision every per-address limit uses:
    /// the X-Real-IP header when the TCP peer is a trusted proxy
    /// (MCP_PROXY_TRUSTED_PROXY: nginx sets it to its client's address), else the peer
    /// itself, whatever the header says.
    pub fn client_source(incoming: &Incoming, trusted_proxies: &[std::net::IpAddr]) -> Source {
        let Some(peer) = incoming.remote.map(|a| unmapped(a.ip())) else {
            return Source(std::net::IpAddr::V4(std::net::Ipv4Addr::UNSPECIFIED));
        };
        if !trusted_proxies.iter().any(|t| unmapped(*t) == peer) {
            return Source::of(peer);
        }
        match incoming.header("x-real-ip").map(|v| v.trim().parse::<std::net::IpAddr>()) {
            Some(Ok(ip)) => Source::of(ip),
            _ => Source::of(peer),
        }
    }

    pub fn header_value<'a>(headers: &'a [(String, String)], name: &str) -> Option<&'a str> {
        headers.iter().find(|(n, _)| n.eq_ignore_ascii_case(name)).map(|(_, v)| v.as_str())
    }

    /// Lower-cased comma-separated tokens of every header of that name.
    pub fn header_tokens(headers: &[(String, String)], name: &str) -> Vec<String> {
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
    pub fn check_request_form(incoming: &Incoming) -> Result<(), ProxyError> {
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

    /// Headers that describe one connection, not the message: never passed on.
    pub fn is_hop_by_hop(name: &str, connection_tokens: &[String]) -> bool {
        let is = |other: &str| name.eq_ignore_ascii_case(other);
        HOP_BY_HOP.iter().any(|hop| is(hop))
            || name.get(..6).is_some_and(|start| start.eq_ignore_ascii_case("proxy-"))
            || connection_tokens.iter().any(|token| is(token))
    }

    /// How the client learns where an answer ends.
    #[derive(Clone, Copy, PartialEq, Eq, Debug)]
    pub enum Framing {
        /// HEAD, 1xx, 204, 304: the head is all there is.
        NoBody,
        Length(u64),
        Chunked,
        /// HTTP/1.0 without a length: the end of the connection is the end.
        UntilClose,
    }

    pub fn framing(method: &str, status: u16, length: Option<u64>, http10: bool) -> Framing {
        if method == "HEAD" || status == 204 || status == 304 || (100..200).contains(&status) {
            return Framing::NoBody;
        }
        match (length, http10) {
            (Some(n), _) => Framing::Length(n),
            (None, false) => Framing::Chunked,
            (None, true) => Framing::UntilClose,
        }
    }

    /// An answer begun: its head is written, its body is the caller's to write.
    pub struct Answer {
        pub writer: Box<dyn Write + Send>,
        /// The head said `Connection: close`: no further request is read from this
        /// connection, and it is closed (lingering) once the answer is done.
        pub closes: bool,
    }

    /// The one place an answer begins (every head but a 101's passes here). The
    /// connection ends after it when the caller asks, the client asked, the answer runs
    /// until close, or — whatever the handler — the request's body was not read to its
    /// end: the rest of that body must never be read as the next request (request
    /// smuggling). The patched tiny_http then reads no further request and closes the
    /// connection lingering, so the client still receives this answer.
    pub fn begin_answer(
        request: tiny_http::Request,
        incoming: &Incoming,
        status: u16,
        headers: &[(String, String)],
        framing: Framing,
        close: bool,
    ) -> io::Result<Answer> {
        let closes = close || incoming.wants_close || framing == Framing::UntilClose || !request.body_read_to_end();
        if closes {
            request.close_connection();
        }
        let mut writer = request.into_writer();
        write_head(&mut writer, status, headers, framing, closes)?;
        let writer = match framing {
            Framing::Length(length) => Box::new(Bounded { inner: writer, left: length }),
            _ => writer,
        };
        Ok(Answer { writer, closes })
    }

    /// An answer's body held to the length its head announced: a byte past it would be
    /// read by the client as the start of the next answer (a container that says one
    /// length and sends more). The client gets the announced length, and a write past it
    /// fails: nothing of it is sent.
    struct Bounded {
        inner: Box<dyn Write + Send>,
        left: u64,
    }

    impl Write for Bounded {
        fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
            if self.left == 0 && !buf.is_empty() {
                log::warn!("an answer ran past the length its head announced: the rest is not sent");
                return Err(io::Error::other("the answer is longer than its Content-Length"));
            }
            let fits = buf.len().min(usize::try_from(self.left).unwrap_or(usize::MAX));
            let written = self.inner.write(&buf[..fits])?;
            self.left -= written as u64;
            Ok(written)
        }

        fn flush(&mut self) -> io::Result<()> {
            self.inner.flush()
        }
    }

    /// A 101: the head of an accepted upgrade, then the connection's two directions
    /// apart for the relay. The connection is the relay's from here on.
    pub fn accept_upgrade(
        request: tiny_http::Request,
        headers: &[(String, String)],
    ) -> io::Result<(Box<dyn Read + Send>, Box<dyn Write + Send>)> {
        let (reader, mut writer) = request.into_reader_writer();
        write_head(&mut writer, 101, headers, Framing::NoBody, false)?;
        writer.flush()?;
        Ok((reader, writer))
    }

    /// The one writer of response heads: status line, headers as given, then the
    /// connection and framing headers the proxy decides, then the blank line.
    fn write_head(
        out: &mut dyn Write,
        status: u16,
        headers: &[(String, String)],
        framing: Framing,
        close: bool,
    ) -> io::Result<()> {
        use std::fmt::Write as _;
        // one buffer, written once: no string made per header
        let size: usize = headers.iter().map(|(name, value)| name.len() + value.len() + 4).sum();
        let mut head = String::with_capacity(size + 96);
        let _ = write!(head, "HTTP/1.1 {} {}\r\n", status, reason_phrase(status));
        for (name, value) in headers {
            for part in [name.as_str(), ": ", value.as_str(), "\r\n"] {
                head.push_str(part);
            }
        }
        if close {
            head.push_str("Connection: close\r\n");
        }
        match framing {
            Framing::Length(len) => {
                let _ = write!(head, "Content-Length: {len}\r\n");
            }
            Framing::Chunked => head.push_str("Transfer-Encoding: chunked\r\n"),
            Framing::NoBody | Framing::UntilClose => {}
        }
        head.push_str("\r\n");
        out.write_all(head.as_bytes())
    }

    /// Writes a complete response with a fixed body (none for HEAD, whose head still
    /// gives the length).
    pub fn send_body(
        request: tiny_http::Request,
        incoming: &Incoming,
        status: u16,
        headers: &[(String, String)],
        body: &[u8],
        close: bool,
    ) -> io::Result<()> {
        let mut answer = begin_answer(request, incoming, status, headers, Framing::Length(body.len() as u64), close)?;
        if incoming.method != "HEAD" {
            answer.writer.write_all(body)?;
        }
        answer.writer.flush()
    }

    /// A JSON answer; a client gone meanwhile is not an error of the proxy's.
    pub fn send_json(request: tiny_http::Request, incoming: &Incoming, status: u16, value: &serde_json::Value) {
        let headers = vec![
            ("Content-Type".to_string(), "application/json".to_string()),
            ("Cache-Control".to_string(), "no-store".to_string()),
        ];
        let _ = send_body(request, incoming, status, &headers, value.to_string().as_bytes(), false);
    }

    /// An error answer. A body left unread closes the connection after it (decided by
    /// `begin_answer` for every answer), and so do the errors that leave the request's
    /// rest in doubt.
    pub fn send_error(request: tiny_http::Request, incoming: &Incoming, error: &ProxyError) {
        let close = error.closes_connection();
        let _ = send_body(request, incoming, error.status(), &error.headers(), &error.body(), close);
    }

    /// Status and headers of an HTTP/1.1 response, read up to the blank line.
    pub fn read_response_head(reader: &mut impl BufRead) -> io::Result<(u16, Vec<(String, String)>)> {
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

    /// A failed route hands the request back (boxed: it is large) when it has not yet
    /// been answered, so the caller can send the error.
    pub type RouteResult = Result<u16, (Option<Box<tiny_http::Request>>, ProxyError)>;

    pub fn reject(request: tiny_http::Request, error: ProxyError) -> RouteResult {
        Err((Some(Box::new(request)), error))
    }

    /// Who a request is from, noted for its log line.
    #[derive(Default)]
    pub struct LogContext {
        pub user: Option<String>,
        pub container: Option<String>,
        /// The MCP call, when the request was an MCP POST: its audit fields.
        pub call: Option<McpCall>,
    }

    /// What an MCP request's log line tells of it: never its arguments.
    pub struct McpCall {
        pub method: String,
        /// The tool of a `tools/call`, the prompt of a `prompts/get`, the URI of a `resources/read`.
        pub name: Option<String>,
        /// The protocol generation's label.
        pub generation: &'static str,
    }

    impl McpCall {
        /// ` method=… tool=… generation=…`, each value escaped.
        pub fn log_fields(&self) -> String {
            let method = if self.method.is_empty() { "(response)" } else { self.method.as_str() };
            let named = match (self.method.as_str(), &self.name) {
                ("tools/call", Some(name)) => format!(" tool={}", log_value(name)),
                ("prompts/get", Some(name)) => format!(" prompt={}", log_value(name)),
                ("resources/read", Some(uri)) => format!(" uri={}", log_value(uri)),
                _ => String::new(),
            };
            format!(" method={}{named} generation={}", log_value(method), self.generation)
        }

        pub fn tool(&self) -> Option<&str> {
            (self.method == "tools/call").then_some(self.name.as_deref()).flatten()
        }
    }

    /// Paths are logged without their query, and cut short, with control characters
    /// replaced: a log line is one line.
    pub fn log_safe(path: &str) -> String {
        path.chars().take(200).map(|c| if c.is_control() { '?' } else { c }).collect()
    }

    /// A value from outside (an Outline display name) in a log line: quoted, with
    /// quotes, backslashes and control characters escaped, and cut short, so it can
    /// neither end the line nor pass for another field.
    pub fn log_value(value: &str) -> String {
        let short: String = value.chars().take(100).collect();
        format!("{short:?}")
    }

    #[cfg(test)]
    mod tests {
        use super::*;
        use crate::tests::incoming;

        #[test]
        fn an_answer_is_held_to_its_announced_length() {
            use std::sync::{Arc, Mutex};
            #[derive(Clone, Default)]
            struct Sent(Arc<Mutex<Vec<u8>>>);
            impl Write for Sent {
                fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
                    self.0.lock().unwrap().extend_from_slice(buf);
                    Ok(buf.len())
                }
                fn flush(&mut self) -> io::Result<()> {
                    Ok(())
                }
            }
            let sent = Sent::default();
            let mut body = Bounded { inner: Box::new(sent.clone()), left: 5 };
            body.write_all(b"he").unwrap();
            // the write that passes the length: the client gets the length, no more
            assert!(body.write_all(b"lloHTTP/1.1 200 OK\r\n").is_err());
            assert_eq!(sent.0.lock().unwrap().as_slice(), b"hello");
            assert!(body.write_all(b"x").is_err());
            body.write_all(b"").unwrap();
            assert_eq!(sent.0.lock().unwrap().as_slice(), b"hello");
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
        fn framing_follows_method_status_length_and_version() {
            assert_eq!(framing("HEAD", 200, Some(5), false), Framing::NoBody);
            for status in [101, 204, 304] {
                assert_eq!(framing("GET", status, None, false), Framing::NoBody, "{status}");
            }
            assert_eq!(framing("GET", 200, Some(5), false), Framing::Length(5));
            assert_eq!(framing("GET", 200, Some(5), true), Framing::Length(5));
            assert_eq!(framing("POST", 200, None, false), Framing::Chunked);
            assert_eq!(framing("POST", 200, None, true), Framing::UntilClose);
        }

        #[test]
        fn the_client_address_is_x_real_ip_only_from_a_trusted_proxy_and_ipv6_counts_by_its_64() {
            let from = |peer: &str, real: Option<&str>| {
                let mut request = incoming(&real.map(|r| vec![("X-Real-IP", r)]).unwrap_or_default());
                request.remote = Some(peer.parse().unwrap());
                request
            };
            let loopback: Vec<std::net::IpAddr> = vec!["127.0.0.1".parse().unwrap()];
            let trusted = |peer: &str, real: Option<&str>| client_source(&from(peer, real), &loopback);
            // nginx on this host names the client; anyone else is who they are
            assert_eq!(trusted("127.0.0.1:1", Some("203.0.113.7")), trusted("203.0.113.7:3", None));
            assert_ne!(trusted("127.0.0.1:1", Some("203.0.113.7")), trusted("127.0.0.1:1", Some("203.0.113.8")));
            assert_eq!(trusted("10.0.0.9:2", Some("203.0.113.7")), trusted("10.0.0.9:2", Some("203.0.113.8")));
            assert_eq!(trusted("10.0.0.9:2", Some("203.0.113.7")), trusted("10.0.0.9:5", None));
            assert_eq!(trusted("[::ffff:127.0.0.1]:1", Some("198.51.100.1")), trusted("198.51.100.1:9", None));
            // a header that is not an address counts as the proxy itself
            assert_eq!(trusted("127.0.0.1:1", Some("nonsense")), trusted("127.0.0.1:2", None));
            // one /64, one bucket; the next /64, another
            assert_eq!(
                trusted("127.0.0.1:1", Some("2001:db8:1:2::1")),
                trusted("127.0.0.1:1", Some("2001:db8:1:2:ffff::9"))
            );
            assert_eq!(trusted("[2001:db8:1:2::1]:1", None), trusted("[2001:db8:1:2:abcd::1]:7", None));
            assert_ne!(
                trusted("127.0.0.1:1", Some("2001:db8:1:2::1")),
                trusted("127.0.0.1:1", Some("2001:db8:1:3::1"))
            );
            // with no trusted proxy, loopback is a client like any other
            assert_eq!(client_source(&from("127.0.0.1:1", Some("203.0.113.7")), &[]), trusted("127.0.0.1:4", None));
        }
    }
}

mod front {
    //! Owns the front door: the listener (the patched tiny_http, a thread per
    //! connection), routing each request, and its log line. Calls every chapter below.
    use crate::auth::{identify, Credential};
    use crate::config::Config;
    use crate::containers::Want;
    use crate::error::ProxyError;
    use crate::modern::{self, Method};
    use crate::protocol::{self, Generation, McpPost, NotTaken, Plan, Refusal};
    use crate::registry::Lease;
    use crate::sessions::{Route, SESSION_HEADER};
    use crate::wire::{self, log_safe, reject, Incoming, LogContext, McpCall, RouteResult};
    use crate::{held, oauth, ops, relay, reopen, websocket, InFlight, Proxy};
    use std::sync::atomic::Ordering;
    use std::sync::Arc;
    use std::time::Instant;

    /// Binds the listener with the patched tiny_http: a header timeout on every
    /// connection, and each request handled on its connection's own thread (no hand-off
    /// per request; a long stream holds only its own connection). The server stops
    /// accepting when the returned value is dropped.
    pub fn start_server(proxy: &Arc<Proxy>) -> Result<tiny_http::Server, String> {
        let cfg = &proxy.cfg;
        let listener =
            std::net::TcpListener::bind(cfg.listen).map_err(|e| format!("cannot listen on {}: {e}", cfg.listen))?;
        widen_backlog(&listener, LISTEN_BACKLOG);
        let handler_proxy = proxy.clone();
        let handler: Arc<dyn Fn(tiny_http::Request) + Send + Sync> =
            Arc::new(move |request| handle_request(&handler_proxy, request));
        // what the library answers by itself (a malformed head, a connection over the
        // cap) is worded as every other error of the proxy's
        let error_page: tiny_http::ErrorPage = Arc::new(|status, reason| {
            let error = ProxyError::Wire(status, reason.to_string());
            ("application/json".to_string(), error.body())
        });
        let handling =
            tiny_http::Handling { handler, max_connections: cfg.max_connections, error_page: Some(error_page) };
        let server = tiny_http::Server::from_listener_with_read_timeout(
            listener,
            None,
            Some(cfg.header_timeout),
            Some(handling),
        )
        .map_err(|e| format!("cannot serve on {}: {e}", cfg.listen))?;
        if let Some(accept) = server.take_accept_thread() {
            crate::background::supervise(proxy, "accept", accept)?;
        }
        log::info!(
            "listening on {} (image {}, key mode {:?}, Outline {})",
            cfg.listen,
            cfg.image,
            cfg.key_mode,
            cfg.outline_url
        );
        Ok(server)
    }

    /// Connections the kernel queues before accept. std listens with 128: a burst beyond
    /// it (300 clients opening streams at once) waits out a SYN retransmit, a whole
    /// second. nginx listens with 511, uvicorn with 2048; the kernel caps it at somaxconn.
    const LISTEN_BACKLOG: i32 = 1024;

    fn widen_backlog(listener: &std::net::TcpListener, backlog: i32) {
        use std::os::fd::AsRawFd;
        extern "C" {
            fn listen(fd: i32, backlog: i32) -> i32;
        }
        // SAFETY: the descriptor is the listener's own and open for the call; listen()
        // on a socket that already listens changes only its backlog.
        if unsafe { listen(listener.as_raw_fd(), backlog) } != 0 {
            log::warn!("could not widen the listen backlog: {}", std::io::Error::last_os_error());
        }
    }

    /// One request from start to log line.
    fn handle_request(proxy: &Arc<Proxy>, request: tiny_http::Request) {
        let started = Instant::now();
        let incoming = Incoming::from(&request);
        let _in_flight = InFlight::enter(&proxy.life);
        let mut log_ctx = LogContext::default();
        let routed = if proxy.life.stopping.load(Ordering::SeqCst) {
            reject(request, ProxyError::ShuttingDown)
        } else {
            route(proxy, request, &incoming, &mut log_ctx)
        };
        let status = match routed {
            Ok(status) => status,
            Err((request, error)) => {
                if let Some(request) = request {
                    wire::send_error(*request, &incoming, &error);
                }
                if error.status() >= 500 {
                    log::warn!("{} {}: {}", incoming.method, log_safe(&incoming.path), error.message());
                }
                error.status()
            }
        };
        // an MCP request's line is its audit line: who called what, how it ended, how long
        let call = match &log_ctx.call {
            Some(call) => {
                proxy.calls.count(if call.method.is_empty() { "(response)" } else { &call.method }, call.tool());
                call.log_fields()
            }
            None => String::new(),
        };
        log::info!(
            "{} {} {} {}ms user={} container={}{call}",
            incoming.method,
            log_safe(&incoming.path),
            status,
            started.elapsed().as_millis(),
            log_ctx.user.as_deref().unwrap_or("-"),
            log_ctx.container.as_deref().unwrap_or("-"),
        );
    }

    /// Checks form, size and origin, then sends the request to the endpoint or the
    /// container it is for.
    fn route(
        proxy: &Arc<Proxy>,
        request: tiny_http::Request,
        incoming: &Incoming,
        log_ctx: &mut LogContext,
    ) -> RouteResult {
        if let Err(e) = admit(&proxy.cfg, incoming) {
            return reject(request, e);
        }
        // the OAuth endpoints answer browsers of any origin (their own pages check theirs)
        if let Some(door) = &proxy.oauth {
            if let Some(endpoint) = door.endpoint_for(&incoming.path) {
                return oauth::serve(proxy, door, request, incoming, endpoint);
            }
        }
        if let Err(e) = check_origin(&proxy.cfg, incoming) {
            return reject(request, e);
        }
        match (incoming.method.as_str(), incoming.path.as_str()) {
            ("GET" | "HEAD", "/health") => return ops::health_endpoint(proxy, request, incoming, log_ctx),
            ("GET" | "HEAD", "/stats") => return ops::stats_endpoint(proxy, request, incoming, false),
            ("GET" | "HEAD", "/metrics") => return ops::stats_endpoint(proxy, request, incoming, true),
            _ => {}
        }
        // the OAuth resource: the token's grant gives the credential; the container
        // sees the request at its own /mcp
        let resource_request;
        let (incoming, who) = match proxy.oauth.as_ref().filter(|door| door.is_resource(&incoming.path)) {
            Some(door) => {
                resource_request = oauth::as_container_request(incoming);
                (&resource_request, oauth::identify_by_token(proxy, door, incoming, log_ctx))
            }
            None => (incoming, identify(proxy, incoming, log_ctx)),
        };
        let (credential, verified, name) = match who {
            Ok(who) => who,
            Err(e) => return reject(request, e),
        };
        let want = Want::new(&proxy.cfg, name, &verified.user, &credential);
        if protocol::is_stateless_get_or_delete(incoming) {
            // 2026-07-28 has no GET stream and no session to delete
            let headers =
                [("Allow".to_string(), "POST".to_string()), ("Content-Type".into(), "application/json".into())];
            let body = Refusal::not_allowed().body().to_string();
            let _ = wire::send_body(request, incoming, 405, &headers, body.as_bytes(), false);
            return Ok(405);
        }
        if protocol::is_mcp_post(incoming) {
            return route_mcp_post(proxy, request, incoming, &credential, &want, log_ctx);
        }
        // an id the proxy did not mint for this user: 404 before any container wakes
        if let Err(e) = proxy.sessions.check(incoming.header(SESSION_HEADER), &want.name) {
            return reject(request, e);
        }
        if reopen::end_while_asleep(proxy, incoming, &want.name) {
            let _ = wire::send_body(request, incoming, 200, &[], b"", false);
            return Ok(200);
        }
        if held::is_notification_stream(incoming) {
            let client_id = incoming.header(SESSION_HEADER).unwrap_or("").trim();
            if let Route::Own { .. } = proxy.sessions.route(Some(client_id), &want.name, None) {
                let slot = match proxy.containers.registry.hold_stream(&want.name) {
                    Ok(slot) => slot,
                    Err(e) => return reject(request, e),
                };
                return held::hold_stream(proxy, request, incoming, &credential, &want.name, client_id, slot);
            }
        }
        let websocket = incoming.is_websocket_upgrade();
        let lease = match proxy.containers.acquire(&want, websocket, &proxy.life.stopping) {
            Ok(lease) => lease,
            Err(e) => return reject(request, e),
        };
        if websocket {
            websocket::relay_websocket(proxy, request, incoming, &credential, &lease)
        } else {
            relay::proxy_http(proxy, request, incoming, &credential, &want, lease, relay::Forward::default())
        }
    }

    /// An MCP POST: its body read and parsed once, then answered here (refusals,
    /// accepted notifications), by the proxy from the container (discover, listen), or
    /// forwarded on the client's session or the user's default one.
    fn route_mcp_post(
        proxy: &Arc<Proxy>,
        mut request: tiny_http::Request,
        incoming: &Incoming,
        credential: &Credential,
        want: &Want,
        log_ctx: &mut LogContext,
    ) -> RouteResult {
        let post = match protocol::read_post(&mut request, incoming, proxy.cfg.max_body) {
            Ok(post) => post,
            Err(NotTaken::Http(e)) => return reject(request, e),
            Err(NotTaken::Rpc(refusal)) => return Ok(refuse(request, incoming, &refusal)),
        };
        log_ctx.call = Some(mcp_call(&post));
        let plan = protocol::plan(incoming, &post, incoming.header(SESSION_HEADER).is_some());
        let stateless = post.generation == Generation::Stateless2026;
        // an id the proxy did not mint for this user: 404 before any container wakes
        // (2026-07-28 has no sessions: an id there is ignored)
        if !stateless {
            if let Err(e) = proxy.sessions.check(incoming.header(SESSION_HEADER), &want.name) {
                return reject(request, e);
            }
        }
        let container_request;
        let incoming = match stateless {
            true => {
                container_request = protocol::as_handshake_request(incoming);
                &container_request
            }
            false => incoming,
        };
        let lease = match plan {
            Plan::Refuse(refusal) => return Ok(refuse(request, incoming, &refusal)),
            Plan::Accept => {
                let _ = wire::send_body(request, incoming, 202, &[], b"", false);
                return Ok(202);
            }
            _ => match acquire(proxy, want) {
                Ok(lease) => lease,
                Err(e) => return reject(request, e),
            },
        };
        match plan {
            Plan::Discover => modern::answer(proxy, request, incoming, credential, lease, &post, Method::Discover),
            Plan::Listen => modern::answer(proxy, request, incoming, credential, lease, &post, Method::Listen),
            plan => {
                let on_default = plan == Plan::OnDefault;
                let forward = relay::Forward { post: Some(post), on_default, stateless };
                relay::proxy_http(proxy, request, incoming, credential, want, lease, forward)
            }
        }
    }

    fn acquire(proxy: &Proxy, want: &Want) -> Result<Lease, ProxyError> {
        proxy.containers.acquire(want, false, &proxy.life.stopping)
    }

    /// What the request's log line tells of an MCP POST (never its arguments).
    fn mcp_call(post: &McpPost) -> McpCall {
        McpCall { method: post.method().to_string(), name: post.name.clone(), generation: post.generation.label() }
    }

    /// A JSON-RPC error the proxy answers itself; the body was read, so the connection stays.
    fn refuse(request: tiny_http::Request, incoming: &Incoming, refusal: &Refusal) -> u16 {
        wire::send_json(request, incoming, refusal.status, &refusal.body());
        refusal.status
    }

    /// What every request must pass before anything else: its form and its declared size.
    fn admit(cfg: &Config, incoming: &Incoming) -> Result<(), ProxyError> {
        wire::check_request_form(incoming)?;
        if incoming.declared_length().is_some_and(|len| len > cfg.max_body) {
            return Err(ProxyError::TooLarge(cfg.max_body));
        }
        Ok(())
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
}

mod oauth {
    //! Owns the OAuth front door: the resource MCP_PROXY_OAUTH_PATH (`/oauth/mcp`), its
    //! discovery documents, clients (metadata documents, then RFC 7591 registration), the
    //! authorize, callback, token and revoke endpoints, and the bearer token of a request
    //! turned into that user's Outline credential. Calls `signin` (the person's step),
    //! `grants` (the store), `auth` (Outline's verdict, who), `wire`, `util`.
    use crate::auth::{Credential, User, Verified};
    use crate::config::ClientDocuments;
    use crate::error::ProxyError;
    use crate::grants::{self, Client, Opened, OutlineCredential, Pending, SignedIn, Store, TokenRefused};
    use crate::signin::{self, OutlineApp, UpstreamRefusal};
    use crate::util::{base64url, constant_time_eq, lock, now_unix, parse_form, Flight};
    use crate::wire::LogContext;
    use crate::wire::{self, Incoming, Source};
    use crate::Proxy;
    use serde_json::{json, Value};
    use sha2::{Digest, Sha256};
    use std::collections::HashMap;
    use std::io::Read;
    use std::sync::{Arc, Mutex};
    use std::time::{Duration, Instant};

    /// The one scope: using the MCP server as yourself.
    pub const SCOPE: &str = "mcp";
    /// The issuer is `{public URL}/oauth`; every endpoint is under it.
    pub const ISSUER_PATH: &str = "/oauth";
    const RESOURCE_METADATA: &str = "/.well-known/oauth-protected-resource";
    const SERVER_METADATA: &str = "/.well-known/oauth-authorization-server";
    /// A client metadata document: at most this big, this slow, and never redirected.
    const DOCUMENT_MAX_BYTES: u64 = 5 * 1024;
    const DOCUMENT_TIMEOUT: Duration = Duration::from_secs(5);
    const DOCUMENT_CACHE: Duration = Duration::from_secs(600);
    /// A document that could not be used is not fetched again for this long.
    const DOCUMENT_FAILURE_CACHE: Duration = Duration::from_secs(60);
    const DOCUMENTS_AT_ONCE: usize = 8;
    /// Fetches one source address may have going at once (of DOCUMENTS_AT_ONCE).
    const DOCUMENTS_PER_ADDRESS: usize = 2;
    /// A sign-in in progress lives this long.
    const SIGN_IN_LIFE: u64 = 600;
    const FORM_MAX_BYTES: u64 = 16 * 1024;
    /// Outline's access token is renewed when it has less than this to live.
    const OUTLINE_RENEW_BEFORE: u64 = 300;

    type Renewal = Result<SignedIn, UpstreamRefusal>;
    /// A client document's client, or why it could not be used.
    type Document = Result<Client, String>;

    pub struct FrontDoor {
        pub grants: Store,
        outline_app: Option<OutlineApp>,
        resource_path: String,
        public_url: Option<String>,
        register_per_hour: u32,
        register_total_per_hour: u32,
        signins_per_address: usize,
        /// MCP_PROXY_TRUSTED_PROXY: whose X-Real-IP names the client.
        trusted_proxies: Vec<std::net::IpAddr>,
        /// Client ID metadata documents are used (MCP_PROXY_OAUTH_CLIENT_DOCUMENTS).
        documents_on: bool,
        fetcher: ureq::Agent,
        fetching: Mutex<Fetching>,
        /// client_id URL → the client, or why its document could not be used, until when.
        documents: Mutex<HashMap<String, (Document, Instant)>>,
        registrations: Mutex<Registrations>,
        signins: Mutex<SignIns>,
        renewing: Mutex<HashMap<String, Arc<Flight<Renewal>>>>,
    }

    /// Token buckets of registrations: one per source address, and one over all.
    struct Registrations {
        per_source: HashMap<Source, (f64, Instant)>,
        total: (f64, Instant),
    }

    /// Sign-ins in progress, counted per source address.
    #[derive(Default)]
    struct SignIns {
        per_source: HashMap<Source, usize>,
        /// request id hash → (who started it, when it expires)
        started: HashMap<String, (Source, u64)>,
    }

    impl SignIns {
        /// Counts a new sign-in of `source`, unless it has `limit` in progress already.
        fn start(&mut self, source: Source, request_id: &str, limit: usize) -> bool {
            if self.per_source.get(&source).is_some_and(|n| *n >= limit) {
                self.forget_expired(now_unix());
            }
            let count = self.per_source.entry(source).or_insert(0);
            if *count >= limit {
                return false;
            }
            *count += 1;
            self.started.insert(grants::token_hash(request_id), (source, now_unix() + SIGN_IN_LIFE));
            true
        }

        /// A sign-in ended (finished, declined or given up): its slot is free.
        fn end(&mut self, request_id: &str) {
            if let Some((source, _)) = self.started.remove(&grants::token_hash(request_id)) {
                self.release(source);
            }
        }

        fn forget_expired(&mut self, now: u64) {
            let expired: Vec<Source> =
                self.started.values().filter(|(_, until)| *until <= now).map(|(source, _)| *source).collect();
            self.started.retain(|_, (_, until)| *until > now);
            for source in expired {
                self.release(source);
            }
        }

        fn release(&mut self, source: Source) {
            if let Some(count) = self.per_source.get_mut(&source) {
                *count = count.saturating_sub(1);
                if *count == 0 {
                    self.per_source.remove(&source);
                }
            }
        }
    }

    /// Client documents being fetched: in all, and per source address.
    #[derive(Default)]
    struct Fetching {
        total: usize,
        per_source: HashMap<Source, usize>,
    }

    /// One fetch's slot, given back when dropped.
    struct FetchSlot<'a> {
        door: &'a FrontDoor,
        source: Source,
    }

    impl Drop for FetchSlot<'_> {
        fn drop(&mut self) {
            let mut fetching = lock(&self.door.fetching);
            fetching.total = fetching.total.saturating_sub(1);
            if let Some(count) = fetching.per_source.get_mut(&self.source) {
                *count = count.saturating_sub(1);
                if *count == 0 {
                    fetching.per_source.remove(&self.source);
                }
            }
        }
    }

    /// The endpoints of the front door.
    #[derive(Clone, Copy, PartialEq, Eq, Debug)]
    pub enum Endpoint {
        ResourceMetadata,
        ServerMetadata,
        Register,
        Authorize,
        Callback,
        Token,
        Revoke,
    }

    /// An OAuth error as RFC 6749 words it: `{"error","error_description"}`.
    #[derive(Debug, PartialEq)]
    pub struct OAuthError {
        pub status: u16,
        pub code: &'static str,
        pub description: String,
    }

    fn oauth_error(status: u16, code: &'static str, description: &str) -> OAuthError {
        OAuthError { status, code, description: description.to_string() }
    }

    fn storage_error() -> OAuthError {
        oauth_error(503, "temporarily_unavailable", "The proxy could not record the grant; try again.")
    }

    fn refused(e: TokenRefused) -> OAuthError {
        match e {
            TokenRefused::InvalidGrant(why) => oauth_error(400, "invalid_grant", why),
            TokenRefused::Replayed => {
                oauth_error(400, "invalid_grant", "The refresh token was already used; the grant is revoked.")
            }
            TokenRefused::Storage => storage_error(),
            TokenRefused::Full => clients_full(),
        }
    }

    fn clients_full() -> OAuthError {
        oauth_error(
            503,
            "temporarily_unavailable",
            "The proxy holds as many registered clients as it keeps, each in use; try again later.",
        )
    }

    /// What an endpoint answers.
    enum Reply {
        Json(u16, Value),
        Page { status: u16, html: String, cookie: Option<String> },
        Redirect { location: String, cookie: Option<String> },
        Error(OAuthError),
        Preflight,
    }

    impl FrontDoor {
        pub fn new(cfg: &crate::config::Config) -> FrontDoor {
            let fetcher_config = crate::util::agent_base()
                .https_only(true)
                .timeout_global(Some(DOCUMENT_TIMEOUT))
                .max_response_header_size(16 * 1024)
                .tls_config(ureq::tls::TlsConfig::builder().root_certs(ureq::tls::RootCerts::PlatformVerifier).build())
                .build();
            let resolver = AddressRule { public_only: cfg.oauth.client_documents != ClientDocuments::Any };
            let connector = ureq::unversioned::transport::DefaultConnector::new();
            let fetcher = ureq::Agent::with_parts(fetcher_config, connector, resolver);
            let outline_app = cfg
                .oauth
                .outline_app
                .as_ref()
                .map(|app| OutlineApp::new(&cfg.outline_url, &app.client_id, &app.client_secret, &app.scope))
                .map(|app| app.keeping_key_in(cfg.state_dir.clone()));
            FrontDoor {
                grants: Store::open(
                    cfg.state_dir.clone(),
                    cfg.oauth.access_ttl,
                    cfg.oauth.refresh_ttl,
                    cfg.oauth.max_clients as usize,
                ),
                outline_app,
                resource_path: cfg.oauth.path.clone(),
                public_url: cfg.oauth.public_url.clone(),
                register_per_hour: cfg.oauth.register_limit,
                register_total_per_hour: cfg.oauth.register_limit_total,
                signins_per_address: cfg.oauth.signins_per_address as usize,
                trusted_proxies: cfg.trusted_proxies.clone(),
                documents_on: cfg.oauth.client_documents != ClientDocuments::Off,
                fetcher,
                fetching: Mutex::new(Fetching::default()),
                documents: Mutex::new(HashMap::new()),
                registrations: Mutex::new(Registrations {
                    per_source: HashMap::new(),
                    total: (f64::from(cfg.oauth.register_limit_total), Instant::now()),
                }),
                signins: Mutex::new(SignIns::default()),
                renewing: Mutex::new(HashMap::new()),
            }
        }

        /// The address a request counts against in the door's per-address limits.
        fn source(&self, incoming: &Incoming) -> Source {
            wire::client_source(incoming, &self.trusted_proxies)
        }

        pub fn is_resource(&self, path: &str) -> bool {
            path == self.resource_path
        }

        pub fn endpoint_for(&self, path: &str) -> Option<Endpoint> {
            if path.strip_prefix(RESOURCE_METADATA) == Some(self.resource_path.as_str()) {
                return Some(Endpoint::ResourceMetadata);
            }
            if path.strip_prefix(SERVER_METADATA) == Some(ISSUER_PATH) {
                return Some(Endpoint::ServerMetadata);
            }
            match path.strip_prefix(ISSUER_PATH)? {
                "/register" => Some(Endpoint::Register),
                "/authorize" => Some(Endpoint::Authorize),
                "/callback" => Some(Endpoint::Callback),
                "/token" => Some(Endpoint::Token),
                "/revoke" => Some(Endpoint::Revoke),
                _ => None,
            }
        }

        /// `https://host` as clients reach the proxy: MCP_PROXY_PUBLIC_URL, else the
        /// request's Host and X-Forwarded-Proto (nginx sets both).
        fn public_base(&self, incoming: &Incoming) -> Result<String, OAuthError> {
            if let Some(url) = &self.public_url {
                return Ok(url.clone());
            }
            let host = incoming.header("host").map(str::trim).unwrap_or("");
            let host_ok = !host.is_empty()
                && host.len() <= 255
                && host.bytes().all(|b| b.is_ascii_alphanumeric() || b".-:[]".contains(&b));
            if !host_ok {
                return Err(oauth_error(400, "invalid_request", "The Host header is missing or not a host name."));
            }
            let https = incoming.header("x-forwarded-proto").is_some_and(|p| p.trim().eq_ignore_ascii_case("https"));
            Ok(format!("{}://{host}", if https { "https" } else { "http" }))
        }

        fn resource_url(&self, base: &str) -> String {
            format!("{base}{}", self.resource_path)
        }

        /// The challenge of a 401 at the resource: where its metadata is, and the scope.
        fn challenge(&self, base: &str, error: Option<&str>) -> String {
            let mut challenge = format!(
                "Bearer resource_metadata=\"{base}{RESOURCE_METADATA}{}\", scope=\"{SCOPE}\"",
                self.resource_path
            );
            if let Some(error) = error {
                challenge.push_str(&format!(", error=\"{error}\""));
            }
            challenge
        }

        /// Forgets expired sign-ins, codes, tokens and rate-limit buckets (the sleeper calls this).
        pub fn prune(&self) {
            self.grants.prune();
            let now = Instant::now();
            lock(&self.documents).retain(|_, (_, until)| *until > now);
            let per_hour = f64::from(self.register_per_hour);
            lock(&self.registrations)
                .per_source
                .retain(|_, (tokens, at)| refilled(*tokens, *at, now, per_hour) < per_hour);
            lock(&self.signins).forget_expired(now_unix());
        }
    }

    /// The request to the resource, as the container sees it: at `/mcp`, query kept.
    pub fn as_container_request(incoming: &Incoming) -> Incoming {
        let query = incoming.target.split_once('?').map(|(_, q)| format!("?{q}")).unwrap_or_default();
        incoming.with_target(&format!("/mcp{query}"))
    }

    /// Whose request to the resource this is: the bearer token opens its grant, whose
    /// Outline credential is checked with Outline like any key (and renewed first when
    /// it is Outline's own token near its end).
    pub fn identify_by_token(
        proxy: &Proxy,
        door: &FrontDoor,
        incoming: &Incoming,
        log_ctx: &mut LogContext,
    ) -> Result<(Credential, Arc<Verified>, String), ProxyError> {
        let base = door.public_base(incoming).map_err(|e| ProxyError::BadRequest(e.description))?;
        let challenge = |error: Option<&str>| door.challenge(&base, error);
        let Some(token) = bearer_token(incoming) else {
            return Err(ProxyError::TokenRequired(
                "Sign in to use this server: your client is sent to this proxy's sign-in with Outline.".into(),
                challenge(None),
            ));
        };
        let invalid = |why: &str| ProxyError::TokenRequired(why.to_string(), challenge(Some("invalid_token")));
        let opened = door.grants.open_with_access(&token).map_err(|e| match e {
            TokenRefused::Storage => ProxyError::OutlineUnreachable("The sign-in store could not be read.".into()),
            _ => invalid("The access token is unknown, expired or revoked; refresh it or sign in again."),
        })?;
        if opened.resource != door.resource_url(&base) {
            return Err(invalid("The access token was issued for another resource."));
        }
        // Outline's refusal (of the renewal, or of the credential) sends the client to
        // refresh or sign in again: a 401 with this resource's challenge
        let refused_by_outline = |e: ProxyError| match e {
            ProxyError::Unauthorized(_) => invalid("Outline no longer accepts this sign-in; sign in again."),
            other => other,
        };
        let signed_in = renewed_upstream(door, &token, opened).map_err(refused_by_outline)?;
        let credential = Credential { key: signed_in.credential.key().to_string() };
        let verified = proxy.auth.verify(&credential.key).map_err(refused_by_outline)?;
        let name = crate::auth::container_of(&verified, log_ctx);
        Ok((credential, verified, name))
    }

    /// The grant's upstream credential, with Outline's own access token renewed first
    /// when it is near its end.
    fn renewed_upstream(door: &FrontDoor, token: &str, opened: Opened) -> Result<SignedIn, ProxyError> {
        let OutlineCredential::Outline { expires_at, .. } = &opened.signed_in.credential else {
            return Ok(opened.signed_in);
        };
        if *expires_at > now_unix() + OUTLINE_RENEW_BEFORE {
            return Ok(opened.signed_in);
        }
        let still_good = *expires_at > now_unix();
        match renew_once(door, &opened.grant_id, RenewalFor::Request { access_token: token }) {
            Ok(renewed) => Ok(renewed),
            Err(UpstreamRefusal::Unreachable) if still_good => Ok(opened.signed_in),
            Err(UpstreamRefusal::Unreachable) => {
                Err(ProxyError::OutlineUnreachable("Outline could not be reached to renew the sign-in.".into()))
            }
            Err(UpstreamRefusal::Refused) => {
                Err(ProxyError::Unauthorized("Outline no longer accepts this sign-in; sign in again.".into()))
            }
        }
    }

    /// Who needs Outline's tokens of a grant renewed, with the token that reopens it.
    #[derive(Clone, Copy)]
    enum RenewalFor<'a> {
        /// A request found Outline's access token near its end: renewed only if it still is.
        Request { access_token: &'a str },
        /// The client's refresh: always renewed (Outline says whether it still stands).
        Refresh { refresh_token: &'a str },
    }

    /// The one way Outline's tokens of a grant are renewed: one renewal per grant at a
    /// time, the others wait for its answer, so Outline's refresh token (which Outline
    /// rotates, and refuses when used again) is never spent twice.
    fn renew_once(door: &FrontDoor, grant_id: &str, asker: RenewalFor) -> Renewal {
        let (flight, leads) = {
            let mut renewing = lock(&door.renewing);
            match renewing.get(grant_id) {
                Some(flight) => (flight.clone(), false),
                None => {
                    let flight = Flight::new();
                    renewing.insert(grant_id.to_string(), flight.clone());
                    (flight, true)
                }
            }
        };
        if !leads {
            return flight.wait();
        }
        let result = renew_outline_token(door, asker);
        lock(&door.renewing).remove(grant_id);
        flight.finish(result.clone());
        result
    }

    /// Leader of a renewal: opens the grant again (another leader may have renewed it
    /// meanwhile, and sealed Outline's new refresh token), asks Outline for new tokens,
    /// and seals them into the grant.
    fn renew_outline_token(door: &FrontDoor, asker: RenewalFor) -> Renewal {
        let Some(app) = &door.outline_app else { return Err(UpstreamRefusal::Refused) };
        let opened = match asker {
            RenewalFor::Request { access_token } => door.grants.open_with_access(access_token),
            RenewalFor::Refresh { refresh_token } => door.grants.open_with_refresh(refresh_token),
        };
        let opened = opened.map_err(|e| match e {
            TokenRefused::Storage => UpstreamRefusal::Unreachable,
            _ => UpstreamRefusal::Refused,
        })?;
        let OutlineCredential::Outline { refresh_token, expires_at, .. } = &opened.signed_in.credential else {
            return Ok(opened.signed_in);
        };
        if matches!(asker, RenewalFor::Request { .. }) && *expires_at > now_unix() + OUTLINE_RENEW_BEFORE {
            return Ok(opened.signed_in);
        }
        renew_at_outline(door, app, &opened, refresh_token).map_err(|failed| match failed {
            RenewalFailed::Outline(refusal) => refusal,
            RenewalFailed::Store(TokenRefused::Storage) => UpstreamRefusal::Unreachable,
            // revoked meanwhile
            RenewalFailed::Store(_) => UpstreamRefusal::Refused,
        })
    }

    /// Why Outline's tokens of a grant were not renewed.
    enum RenewalFailed {
        Outline(UpstreamRefusal),
        /// The grant could not be sealed again (revoked meanwhile, or the disk).
        Store(TokenRefused),
    }

    /// Outline's tokens of an opened grant renewed at Outline and sealed back into it
    /// (for a request, and for the client's refresh); Outline's refusal ends the grant.
    fn renew_at_outline(
        door: &FrontDoor,
        app: &OutlineApp,
        opened: &Opened,
        outline_refresh: &str,
    ) -> Result<SignedIn, RenewalFailed> {
        match app.refresh(outline_refresh) {
            Ok(upstream) => {
                let mut renewed = opened.signed_in.clone();
                renewed.credential = upstream;
                door.grants.reseal(opened, &renewed).map_err(RenewalFailed::Store)?;
                Ok(renewed)
            }
            Err(UpstreamRefusal::Refused) => {
                log::info!("Outline refused to renew a sign-in: its grant is revoked");
                // a revocation that did not reach the disk is said, not ignored
                door.grants.revoke_grant(&opened.grant_id).map_err(RenewalFailed::Store)?;
                Err(RenewalFailed::Outline(UpstreamRefusal::Refused))
            }
            Err(e) => Err(RenewalFailed::Outline(e)),
        }
    }

    fn bearer_token(incoming: &Incoming) -> Option<String> {
        let token = crate::auth::bearer(incoming.header("authorization")?)?;
        (!token.is_empty() && token.len() <= 256).then(|| token.to_string())
    }

    /// One request to an endpoint of the front door, answered.
    pub fn serve(
        proxy: &Proxy,
        door: &FrontDoor,
        mut request: tiny_http::Request,
        incoming: &Incoming,
        endpoint: Endpoint,
    ) -> crate::wire::RouteResult {
        let reply = match door.public_base(incoming) {
            Err(e) => Reply::Error(e),
            Ok(base) => match (endpoint, incoming.method.as_str()) {
                (Endpoint::ServerMetadata, "GET" | "HEAD") => {
                    Reply::Json(200, server_metadata(&base, door.documents_on))
                }
                (_, "OPTIONS") if endpoint != Endpoint::Authorize && endpoint != Endpoint::Callback => Reply::Preflight,
                (Endpoint::ResourceMetadata, "GET" | "HEAD") => Reply::Json(200, resource_metadata(door, &base)),
                (Endpoint::Authorize, "GET") => authorize_start(door, incoming, &base),
                (Endpoint::Callback, "GET") => outline_callback(proxy, door, incoming, &base),
                (Endpoint::Register | Endpoint::Token | Endpoint::Revoke | Endpoint::Authorize, "POST") => {
                    match read_form(&mut request, incoming) {
                        Err(e) => Reply::Error(e),
                        Ok(body) => match endpoint {
                            Endpoint::Register => register(door, incoming, &body),
                            Endpoint::Token => token(proxy, door, incoming, &body),
                            Endpoint::Revoke => revoke(door, incoming, &body),
                            _ => authorize_answer(proxy, door, incoming, &base, &body),
                        },
                    }
                }
                _ => Reply::Error(oauth_error(405, "invalid_request", "This method is not used at this address.")),
            },
        };
        Ok(send(request, incoming, reply))
    }

    fn send(request: tiny_http::Request, incoming: &Incoming, reply: Reply) -> u16 {
        let text = |n: &str, v: &str| (n.to_string(), v.to_string());
        let api_headers = || {
            vec![
                text("Content-Type", "application/json"),
                text("Cache-Control", "no-store"),
                text("Pragma", "no-cache"),
                text("Access-Control-Allow-Origin", "*"),
            ]
        };
        let (status, headers, body) = match reply {
            Reply::Json(status, value) => (status, api_headers(), value.to_string().into_bytes()),
            Reply::Error(e) => {
                let mut headers = api_headers();
                if e.status == 429 {
                    headers.push(text("Retry-After", "60"));
                }
                if e.status == 405 {
                    headers.push(text("Allow", "GET, POST, OPTIONS"));
                }
                if e.status == 401 {
                    headers.push(text("WWW-Authenticate", "Basic realm=\"outline-mcp-proxy oauth\""));
                }
                let body = json!({"error": e.code, "error_description": e.description});
                (e.status, headers, body.to_string().into_bytes())
            }
            Reply::Page { status, html, cookie } => {
                let mut headers = signin::page_headers();
                headers.extend(cookie.map(|c| text("Set-Cookie", &c)));
                (status, headers, html.into_bytes())
            }
            Reply::Redirect { location, cookie } => {
                let mut headers = signin::page_headers();
                headers.push(text("Location", &location));
                headers.extend(cookie.map(|c| text("Set-Cookie", &c)));
                (303, headers, Vec::new())
            }
            Reply::Preflight => {
                let headers = vec![
                    text("Access-Control-Allow-Origin", "*"),
                    text("Access-Control-Allow-Methods", "GET, POST, OPTIONS"),
                    text("Access-Control-Allow-Headers", "Authorization, Content-Type, MCP-Protocol-Version"),
                    text("Access-Control-Max-Age", "600"),
                ];
                (204, headers, Vec::new())
            }
        };
        let _ = wire::send_body(request, incoming, status, &headers, &body, false);
        status
    }

    /// A form or JSON body of at most 16 KiB.
    fn read_form(request: &mut tiny_http::Request, incoming: &Incoming) -> Result<Vec<u8>, OAuthError> {
        if incoming.declared_length().is_some_and(|len| len > FORM_MAX_BYTES) {
            return Err(oauth_error(413, "invalid_request", "The request body is too large."));
        }
        let mut body = Vec::new();
        request
            .as_reader()
            .take(FORM_MAX_BYTES + 1)
            .read_to_end(&mut body)
            .map_err(|_| oauth_error(400, "invalid_request", "The request body could not be read."))?;
        if body.len() as u64 > FORM_MAX_BYTES {
            return Err(oauth_error(413, "invalid_request", "The request body is too large."));
        }
        Ok(body)
    }

    /// RFC 9728: what the resource is and who issues its tokens.
    fn resource_metadata(door: &FrontDoor, base: &str) -> Value {
        json!({
            "resource": door.resource_url(base),
            "authorization_servers": [format!("{base}{ISSUER_PATH}")],
            "scopes_supported": [SCOPE],
            "bearer_methods_supported": ["header"],
            "resource_name": "Outline",
        })
    }

    /// RFC 8414: the proxy's own authorization server.
    fn server_metadata(base: &str, documents_on: bool) -> Value {
        let issuer = format!("{base}{ISSUER_PATH}");
        json!({
            "issuer": issuer,
            "authorization_endpoint": format!("{issuer}/authorize"),
            "token_endpoint": format!("{issuer}/token"),
            "registration_endpoint": format!("{issuer}/register"),
            "revocation_endpoint": format!("{issuer}/revoke"),
            "scopes_supported": [SCOPE],
            "response_types_supported": ["code"],
            "response_modes_supported": ["query"],
            "grant_types_supported": ["authorization_code", "refresh_token"],
            "code_challenge_methods_supported": ["S256"],
            "token_endpoint_auth_methods_supported": ["none", "client_secret_post", "client_secret_basic"],
            "revocation_endpoint_auth_methods_supported": ["none", "client_secret_post", "client_secret_basic"],
            "client_id_metadata_document_supported": documents_on,
            "authorization_response_iss_parameter_supported": true,
        })
    }

    /// Where a redirect URI may point: https anywhere, http only to this computer
    /// (RFC 8252 loopback), or an app's own scheme; never a script, a file or a fragment;
    /// and never a URI a browser reads with another host than the proxy would (see
    /// `authority_of`).
    pub fn check_redirect_uri(uri: &str) -> Result<(), &'static str> {
        if uri.is_empty() || uri.len() > 2000 || uri.bytes().any(|b| b <= b' ' || b == 0x7f) || uri.contains('#') {
            return Err("A redirect URI must be a plain URL without spaces or a fragment.");
        }
        let Some((scheme, rest)) = uri.split_once(':') else { return Err("A redirect URI needs a scheme.") };
        let host = authority_of(uri)?;
        let scheme = scheme.to_ascii_lowercase();
        match scheme.as_str() {
            "https" => match host {
                Some(host) if !host.is_empty() => Ok(()),
                _ => Err("An https redirect URI needs a host."),
            },
            "http" if loopback_parts(uri).is_some() => Ok(()),
            "http" => Err("An http redirect URI must be a loopback address (127.0.0.1, [::1] or localhost)."),
            "javascript" | "data" | "file" | "vbscript" | "blob" | "about" | "ws" | "wss" | "ftp" => {
                Err("This kind of redirect URI is not allowed.")
            }
            _ if scheme.starts_with(|c: char| c.is_ascii_lowercase())
                && scheme.chars().all(|c| c.is_ascii_lowercase() || c.is_ascii_digit() || "+-.".contains(c))
                && !rest.is_empty() =>
            {
                Ok(())
            }
            _ => Err("The redirect URI's scheme is not valid."),
        }
    }

    /// The host of `scheme://authority/…` (lower-cased, port cut, brackets kept; None
    /// without `//`), refusing what a browser (the WHATWG URL parser) would read as
    /// another host than the text seems to name: a backslash (a browser reads it as
    /// `/`, so `https://evil.example\.claude.ai/` goes to evil.example), user info
    /// (`claude.ai@evil.example`), anything but ASCII letters, digits, `-`, `.` and `_`
    /// in the name (no percent-encoding, no Unicode look-alikes), and a number that is
    /// not a plain a.b.c.d (`0x7f.1` is 127.0.0.1 to a browser).
    fn authority_of(uri: &str) -> Result<Option<String>, &'static str> {
        if uri.contains('\\') {
            return Err("A redirect URI must not contain a backslash: browsers read it as /, so its host would not be the one it seems.");
        }
        let Some((_, rest)) = uri.split_once("://") else { return Ok(None) };
        let authority = rest.split(['/', '?', '#']).next().unwrap_or("");
        if authority.contains('@') {
            return Err("A redirect URI must not carry user info (a name and @ before its host): browsers go to the host after the @.");
        }
        if !authority.is_ascii() {
            return Err("A redirect URI's host must be ASCII: write an international name in its xn-- form.");
        }
        let (host, port) = match authority.strip_prefix('[') {
            Some(inner) => {
                let (literal, after) = inner.split_once(']').ok_or("A redirect URI's IPv6 address lacks its ].")?;
                if literal.parse::<std::net::Ipv6Addr>().is_err() {
                    return Err("A redirect URI's IPv6 address is not valid.");
                }
                (&authority[..literal.len() + 2], after.strip_prefix(':').or(Some(after).filter(|a| a.is_empty())))
            }
            None => match authority.split_once(':') {
                Some((host, port)) => (host, Some(port)),
                None => (authority, Some("")),
            },
        };
        let port_ok = port.is_some_and(|p| p.is_empty() || (p.len() <= 5 && p.bytes().all(|b| b.is_ascii_digit())));
        if !port_ok {
            return Err("A redirect URI's port must be a number.");
        }
        if !host.starts_with('[') {
            if !host.bytes().all(|b| b.is_ascii_alphanumeric() || b"-._".contains(&b)) {
                return Err("A redirect URI's host may hold only letters, digits, -, . and _.");
            }
            let last = host.trim_end_matches('.').rsplit('.').next().unwrap_or("");
            let numeric = !last.is_empty()
                && (last.bytes().all(|b| b.is_ascii_digit()) || last.to_ascii_lowercase().starts_with("0x"));
            let plain_ipv4 = host.parse::<std::net::Ipv4Addr>().is_ok_and(|ip| ip.to_string() == host);
            if numeric && !plain_ipv4 {
                return Err("A redirect URI's host is a number browsers read as another address: write it as a.b.c.d.");
            }
        }
        Ok(Some(host.to_ascii_lowercase()))
    }

    /// `scheme://host[:port]/…` → host (lower-cased, port cut, brackets kept), when it
    /// is one a browser reads the same way.
    fn host_of(uri: &str) -> Option<String> {
        authority_of(uri).ok().flatten()
    }

    /// An http loopback URI as (host, path and query), its port left out (RFC 8252 §7.3:
    /// a native app's port is chosen when it runs).
    fn loopback_parts(uri: &str) -> Option<(String, String)> {
        let rest = uri.strip_prefix("http://").or_else(|| uri.strip_prefix("HTTP://"))?;
        let host = host_of(uri)?;
        if !["127.0.0.1", "[::1]", "localhost"].contains(&host.as_str()) {
            return None;
        }
        let path = rest.find(['/', '?']).map(|i| &rest[i..]).unwrap_or("/");
        Some((host, path.to_string()))
    }

    /// The redirect URI asked for is one the client registered (for loopback: any port).
    pub fn redirect_matches(registered: &[String], asked: &str) -> bool {
        registered
            .iter()
            .any(|r| r == asked || matches!((loopback_parts(r), loopback_parts(asked)), (Some(a), Some(b)) if a == b))
    }

    /// RFC 7591: a public client (no secret) for the authorization code grant,
    /// limited per source address and over all.
    fn register(door: &FrontDoor, incoming: &Incoming, body: &[u8]) -> Reply {
        if let Err(why) = take_registration_slot(door, incoming) {
            return Reply::Error(oauth_error(429, "too_many_requests", why));
        }
        let invalid = |why: &str| Reply::Error(oauth_error(400, "invalid_client_metadata", why));
        let Ok(meta) = serde_json::from_slice::<Value>(body) else {
            return invalid("The registration must be a JSON object.");
        };
        let redirect_uris = match redirect_uris_of(&meta) {
            Ok(uris) => uris,
            Err(why) => return Reply::Error(oauth_error(400, "invalid_redirect_uri", why)),
        };
        let listed = |field: &str| -> Option<Vec<String>> {
            meta.get(field)?.as_array().map(|a| a.iter().filter_map(Value::as_str).map(str::to_string).collect())
        };
        if listed("grant_types").is_some_and(|g| g.iter().any(|t| t != "authorization_code" && t != "refresh_token")) {
            return invalid("Only the authorization_code and refresh_token grants are offered.");
        }
        if listed("response_types").is_some_and(|r| r.iter().any(|t| t != "code")) {
            return invalid("Only the code response type is offered.");
        }
        // public (PKCE alone) unless the client asks for a secret; absent means public,
        // as MCP clients that say nothing expect
        let method = meta.get("token_endpoint_auth_method").and_then(Value::as_str).unwrap_or("none");
        if !matches!(method, "none" | "client_secret_post" | "client_secret_basic") {
            return invalid("token_endpoint_auth_method must be none, client_secret_post or client_secret_basic.");
        }
        let name = client_name_of(&meta, &redirect_uris);
        let (Ok(client_id), Ok(secret)) = (grants::new_secret("client"), grants::new_secret("secret")) else {
            return Reply::Error(storage_error());
        };
        let secret = (method != "none").then_some(secret);
        let client = Client {
            id: client_id.clone(),
            name: name.clone(),
            redirect_uris: redirect_uris.clone(),
            created_at: now_unix(),
            secret_hash: secret.as_deref().map(grants::token_hash),
        };
        match door.grants.add_client(client) {
            Ok(()) => {}
            Err(TokenRefused::Full) => return Reply::Error(clients_full()),
            Err(_) => return Reply::Error(storage_error()),
        }
        log::info!("OAuth client registered: {} ({method})", crate::wire::log_value(&name));
        let mut answer = json!({
            "client_id": client_id,
            "client_id_issued_at": now_unix(),
            "client_name": name,
            "redirect_uris": redirect_uris,
            "grant_types": ["authorization_code", "refresh_token"],
            "response_types": ["code"],
            "token_endpoint_auth_method": method,
            "scope": SCOPE,
        });
        if let Some(secret) = secret {
            answer["client_secret"] = json!(secret);
            answer["client_secret_expires_at"] = json!(0);
        }
        Reply::Json(201, answer)
    }

    /// A registration takes a slot from its source address's bucket
    /// (MCP_PROXY_OAUTH_REGISTER_LIMIT an hour) and from the bucket over all addresses
    /// (MCP_PROXY_OAUTH_REGISTER_LIMIT_TOTAL an hour): from both, or from neither.
    fn take_registration_slot(door: &FrontDoor, incoming: &Incoming) -> Result<(), &'static str> {
        let source = door.source(incoming);
        let per_source = f64::from(door.register_per_hour);
        let per_total = f64::from(door.register_total_per_hour);
        let now = Instant::now();
        let mut buckets = lock(&door.registrations);
        let total = refilled(buckets.total.0, buckets.total.1, now, per_total);
        buckets.total = (total, now);
        let (tokens, at) = buckets.per_source.entry(source).or_insert((per_source, now));
        *tokens = refilled(*tokens, *at, now, per_source);
        *at = now;
        if *tokens < 1.0 {
            return Err("Too many client registrations from this address; try again later.");
        }
        if total < 1.0 {
            return Err("Too many client registrations on this server this hour; try again later.");
        }
        *tokens -= 1.0;
        buckets.total.0 -= 1.0;
        Ok(())
    }

    /// A registration bucket's slots at `now`: `per_hour` come back an hour, at most `per_hour`.
    fn refilled(tokens: f64, at: Instant, now: Instant, per_hour: f64) -> f64 {
        (tokens + now.duration_since(at).as_secs_f64() * per_hour / 3600.0).min(per_hour)
    }

    fn redirect_uris_of(meta: &Value) -> Result<Vec<String>, &'static str> {
        let uris: Vec<String> = meta
            .get("redirect_uris")
            .and_then(Value::as_array)
            .ok_or("redirect_uris (a list) is required.")?
            .iter()
            .map(|u| u.as_str().map(str::to_string).ok_or("Every redirect URI must be a string."))
            .collect::<Result<_, _>>()?;
        if uris.is_empty() || uris.len() > 10 {
            return Err("Between one and ten redirect URIs are allowed.");
        }
        for uri in &uris {
            check_redirect_uri(uri)?;
        }
        Ok(uris)
    }

    /// What the consent page calls the client: its `client_name` (printable, at most
    /// 80 characters), else the host it sends people back to.
    fn client_name_of(meta: &Value, redirect_uris: &[String]) -> String {
        let name: String = meta
            .get("client_name")
            .and_then(Value::as_str)
            .unwrap_or("")
            .chars()
            .filter(|c| !c.is_control())
            .take(80)
            .collect();
        let name = name.trim().to_string();
        if name.is_empty() {
            redirect_uris.first().map(|u| redirect_host(u)).unwrap_or_else(|| "An application".into())
        } else {
            name
        }
    }

    /// Where the person goes back to, in words.
    fn redirect_host(uri: &str) -> String {
        if let Some((host, _)) = loopback_parts(uri) {
            return format!("an app on this computer ({host})");
        }
        match host_of(uri) {
            Some(host) => host,
            None => format!("the app that opens {}: links", uri.split(':').next().unwrap_or("")),
        }
    }

    /// The client behind a `client_id`: a registered one, or, for an https URL, the
    /// metadata document found there (fetched with limits, in all and per source
    /// address; cached ten minutes, or a minute when it could not be used).
    fn client_for(door: &FrontDoor, client_id: &str, source: Source) -> Result<Client, String> {
        if !client_id.starts_with("https://") {
            return door.grants.client(client_id).ok_or_else(|| "This client is not registered here.".into());
        }
        if !door.documents_on {
            return Err("This server does not use client metadata documents: the client must register.".into());
        }
        if let Some((known, until)) = lock(&door.documents).get(client_id) {
            if *until > Instant::now() {
                return known.clone();
            }
        }
        let path = client_id["https://".len()..].split_once('/').map(|(_, p)| p).unwrap_or("");
        if path.is_empty() || client_id.contains('#') || client_id.len() > 2000 || host_of(client_id).is_none() {
            return Err("A client_id URL must be https with a path and no fragment.".into());
        }
        let fetched = {
            let _slot = take_fetch_slot(door, source)?;
            fetch_client_document(door, client_id)
        };
        let life = if fetched.is_ok() { DOCUMENT_CACHE } else { DOCUMENT_FAILURE_CACHE };
        let mut documents = lock(&door.documents);
        if documents.len() >= 1000 {
            documents.retain(|_, (_, until)| *until > Instant::now());
        }
        if documents.len() < 1000 {
            documents.insert(client_id.to_string(), (fetched.clone(), Instant::now() + life));
        }
        fetched
    }

    /// A slot to fetch a client document in: DOCUMENTS_AT_ONCE in all, and
    /// DOCUMENTS_PER_ADDRESS of them for one source address.
    fn take_fetch_slot(door: &FrontDoor, source: Source) -> Result<FetchSlot<'_>, String> {
        let mut fetching = lock(&door.fetching);
        if fetching.per_source.get(&source).is_some_and(|n| *n >= DOCUMENTS_PER_ADDRESS) {
            return Err("Too many client documents are being fetched for this address; try again shortly.".into());
        }
        if fetching.total >= DOCUMENTS_AT_ONCE {
            return Err("Too many client documents are being fetched; try again shortly.".into());
        }
        fetching.total += 1;
        *fetching.per_source.entry(source).or_insert(0) += 1;
        Ok(FetchSlot { door, source })
    }

    /// ureq's own name resolution, then (by default) only public addresses are kept, so
    /// a client_id URL cannot point the proxy at this host, its private network or the
    /// cloud's metadata service; the connection goes to an address kept here, so a
    /// second lookup (DNS rebinding) changes nothing.
    #[derive(Debug)]
    struct AddressRule {
        public_only: bool,
    }

    impl ureq::unversioned::resolver::Resolver for AddressRule {
        fn resolve(
            &self,
            uri: &ureq::http::Uri,
            config: &ureq::config::Config,
            timeout: ureq::unversioned::transport::NextTimeout,
        ) -> Result<ureq::unversioned::resolver::ResolvedSocketAddrs, ureq::Error> {
            let all = ureq::unversioned::resolver::DefaultResolver::default().resolve(uri, config, timeout)?;
            let mut kept = self.empty();
            for addr in all.iter().filter(|a| !self.public_only || is_public_address(a.ip())) {
                kept.push(*addr);
            }
            if kept.is_empty() {
                let refused = std::io::Error::new(std::io::ErrorKind::PermissionDenied, "not a public address");
                return Err(ureq::Error::Io(refused));
            }
            Ok(kept)
        }
    }

    /// An address on the public internet: not this host, a private or shared network,
    /// link-local (the cloud's metadata service), multicast, or reserved.
    pub fn is_public_address(ip: std::net::IpAddr) -> bool {
        use std::net::IpAddr;
        match ip {
            IpAddr::V4(v4) => {
                let [a, b, c, _] = v4.octets();
                !(v4.is_loopback()
                    || v4.is_private()
                    || v4.is_link_local()
                    || v4.is_unspecified()
                    || v4.is_broadcast()
                    || v4.is_multicast()
                    || v4.is_documentation()
                    || a == 0
                    || (a == 100 && (64..128).contains(&b))
                    || (a == 192 && b == 0 && c == 0)
                    || (a == 198 && (b == 18 || b == 19))
                    || a >= 240)
            }
            IpAddr::V6(v6) => {
                if let Some(v4) = v6.to_ipv4_mapped() {
                    return is_public_address(IpAddr::V4(v4));
                }
                let first = v6.segments()[0];
                !(v6.is_loopback()
                    || v6.is_unspecified()
                    || v6.is_multicast()
                    || (first & 0xfe00) == 0xfc00
                    || (first & 0xffc0) == 0xfe80
                    || (first == 0x64 && v6.segments()[1] == 0xff9b)
                    || first == 0x2001 && v6.segments()[1] == 0x0db8)
            }
        }
    }

    fn fetch_client_document(door: &FrontDoor, url: &str) -> Result<Client, String> {
        let failed = |why: &str| format!("The client's metadata document could not be used: {why}");
        let mut response = door.fetcher.get(url).header("Accept", "application/json").call().map_err(|e| match e {
            ureq::Error::Io(io) if io.kind() == std::io::ErrorKind::PermissionDenied => {
                failed("its host is not at a public address (MCP_PROXY_OAUTH_CLIENT_DOCUMENTS).")
            }
            other => failed(&crate::auth::describe_ureq_error(&other)),
        })?;
        let status = response.status().as_u16();
        if (300..400).contains(&status) {
            return Err(failed("it redirects elsewhere, and redirects are not followed."));
        }
        if status != 200 {
            return Err(failed(&format!("its server answered {status}.")));
        }
        let body = response.body_mut().with_config().limit(DOCUMENT_MAX_BYTES).read_to_vec().map_err(|e| match e {
            ureq::Error::BodyExceedsLimit(_) => failed("it is larger than 5 KiB."),
            other => failed(&crate::auth::describe_ureq_error(&other)),
        })?;
        let meta: Value = serde_json::from_slice(&body).map_err(|_| failed("it is not JSON."))?;
        if meta.get("client_id").and_then(Value::as_str) != Some(url) {
            return Err(failed("its client_id is not its own URL."));
        }
        let redirect_uris = redirect_uris_of(&meta).map_err(failed)?;
        let name = client_name_of(&meta, &redirect_uris);
        Ok(Client { id: url.to_string(), name, redirect_uris, created_at: now_unix(), secret_hash: None })
    }

    /// `GET /oauth/authorize`: the client and its redirect URI are checked (a bad one
    /// gets a page, never a redirect), then the request (PKCE S256, the resource), then
    /// the consent page is shown with a cookie tying it to this browser.
    fn authorize_start(door: &FrontDoor, incoming: &Incoming, base: &str) -> Reply {
        let params = match query_params(incoming) {
            Ok(params) => params,
            Err(why) => return problem(400, why),
        };
        let get = |k: &str| params.get(k).map(String::as_str).filter(|v| !v.is_empty());
        let Some(client_id) = get("client_id") else { return problem(400, "The request names no client (client_id).") };
        let source = door.source(incoming);
        let client = match client_for(door, client_id, source) {
            Ok(client) => client,
            Err(why) => return problem(400, &why),
        };
        let Some(redirect_uri) = get("redirect_uri") else {
            return problem(400, "The request has no redirect_uri.");
        };
        if !redirect_matches(&client.redirect_uris, redirect_uri) {
            return problem(400, "The redirect_uri is not one this client registered.");
        }
        // a client registered before the redirect URI rules were tightened is held to them too
        if let Err(why) = check_redirect_uri(redirect_uri) {
            return problem(400, why);
        }
        let state = get("state").map(str::to_string);
        let back = |code: &'static str, why: &str| Reply::Redirect {
            location: client_redirect(
                redirect_uri,
                &[("error", code), ("error_description", why)],
                state.as_deref(),
                base,
            ),
            cookie: None,
        };
        if get("response_type") != Some("code") {
            return back("unsupported_response_type", "Only response_type=code is offered.");
        }
        let challenge = get("code_challenge").unwrap_or("");
        if get("code_challenge_method") != Some("S256") || !is_pkce_challenge(challenge) {
            return back("invalid_request", "PKCE with code_challenge_method=S256 is required.");
        }
        match get("resource") {
            None => return back("invalid_target", "The resource parameter (RFC 8707) is required."),
            Some(resource) if resource.trim_end_matches('/') != door.resource_url(base) => {
                return back("invalid_target", "This server issues tokens only for its own resource.")
            }
            Some(_) => {}
        }
        let (Ok(request_id), Ok(csrf)) = (grants::new_secret("rq"), grants::new_secret("cs")) else {
            return problem(503, "The proxy could not start a sign-in; try again.");
        };
        let pending = Pending {
            client_id: client.id.clone(),
            client_name: client.name.clone(),
            redirect_uri: redirect_uri.to_string(),
            state,
            code_challenge: challenge.to_string(),
            resource: door.resource_url(base),
            csrf_hash: grants::token_hash(&csrf),
            attempts: 0,
            expires_at: now_unix() + SIGN_IN_LIFE,
        };
        if !lock(&door.signins).start(source, &request_id, door.signins_per_address) {
            return problem(
                429,
                "Too many sign-ins are in progress from this address; finish one, or try again in a few minutes.",
            );
        }
        if door.grants.sign_ins.add_pending(&request_id, pending.clone()).is_err() {
            lock(&door.signins).end(&request_id);
            return problem(503, "Too many sign-ins are in progress; try again in a few minutes.");
        }
        let cookie = signin::set_cookie(&request_id, &csrf, base.starts_with("https://"));
        consent(door, &pending, &request_id, &csrf, None, Some(cookie))
    }

    fn consent(
        door: &FrontDoor,
        pending: &Pending,
        request_id: &str,
        csrf: &str,
        error: Option<&str>,
        cookie: Option<String>,
    ) -> Reply {
        let html = signin::consent_page(&signin::Page {
            client_name: &pending.client_name,
            redirect_host: &redirect_host(&pending.redirect_uri),
            request_id,
            csrf,
            asks_for_key: door.outline_app.is_none(),
            error,
        });
        Reply::Page { status: if error.is_some() { 400 } else { 200 }, html, cookie }
    }

    fn problem(status: u16, why: &str) -> Reply {
        Reply::Page { status, html: signin::problem_page(why), cookie: None }
    }

    /// `POST /oauth/authorize`: the person's answer on the consent page. Checked to
    /// come from that page in this browser (same origin, the cookie and the form agree).
    fn authorize_answer(proxy: &Proxy, door: &FrontDoor, incoming: &Incoming, base: &str, body: &[u8]) -> Reply {
        if !same_origin(incoming, base) {
            return problem(403, "This form must be sent from the sign-in page itself.");
        }
        let form = match single_valued(parse_form(body)) {
            Ok(form) => form,
            Err(why) => return problem(400, why),
        };
        let field = |k: &str| form.get(k).map(String::as_str).unwrap_or("");
        let request_id = field("request");
        let pending = match sign_in_of(door, incoming, request_id, Some(field("csrf"))) {
            Ok(pending) => pending,
            Err(page) => return page,
        };
        if field("action") != "allow" {
            return declined(door, request_id, &pending, base, "The person declined.");
        }
        if let Some(app) = &door.outline_app {
            let callback = format!("{base}{ISSUER_PATH}/callback");
            let Some(verifier) = app.verifier(request_id) else {
                return problem(503, "The proxy could not start the sign-in with Outline; try again.");
            };
            let location = app.authorize_url(&callback, request_id, &pkce_challenge(&verifier));
            return Reply::Redirect { location, cookie: None };
        }
        let key = field("api_key").trim();
        if !crate::auth::is_plausible_key(key) || key.starts_with(crate::auth::TOKEN_PREFIX) {
            if door.grants.sign_ins.count_attempt(request_id) >= 5 {
                lock(&door.signins).end(request_id);
            }
            let why = "That does not look like an Outline API key: paste the whole key.";
            return consent(door, &pending, request_id, field("csrf"), Some(why), None);
        }
        match proxy.auth.ask_outline(key) {
            Ok(user) => {
                finish_sign_in(door, request_id, OutlineCredential::ApiKey { key: key.to_string() }, &user, base)
            }
            Err(ProxyError::Unauthorized(_)) => {
                if door.grants.sign_ins.count_attempt(request_id) >= 5 {
                    lock(&door.signins).end(request_id);
                    return problem(400, "Outline refused five keys; start again from your app.");
                }
                let why = "Outline does not accept this API key. Check it and try again.";
                consent(door, &pending, request_id, field("csrf"), Some(why), None)
            }
            Err(_) => {
                let why = "Outline could not be reached to check the key; try again in a moment.";
                consent(door, &pending, request_id, field("csrf"), Some(why), None)
            }
        }
    }

    /// `GET /oauth/callback`: Outline sends the person back with its code.
    fn outline_callback(proxy: &Proxy, door: &FrontDoor, incoming: &Incoming, base: &str) -> Reply {
        let Some(app) = &door.outline_app else {
            return problem(400, "Sign-in with Outline is not set up on this server.");
        };
        let params = match query_params(incoming) {
            Ok(params) => params,
            Err(why) => return problem(400, why),
        };
        let get = |k: &str| params.get(k).map(String::as_str).unwrap_or("");
        let request_id = get("state");
        let pending = match sign_in_of(door, incoming, request_id, None) {
            Ok(pending) => pending,
            Err(page) => return page,
        };
        if get("code").is_empty() {
            return declined(door, request_id, &pending, base, "Outline did not grant access.");
        }
        let callback = format!("{base}{ISSUER_PATH}/callback");
        let Some(verifier) = app.verifier(request_id) else {
            return problem(503, "The proxy could not finish the sign-in with Outline; try again.");
        };
        let upstream = match app.exchange(get("code"), &callback, &verifier) {
            Ok(upstream) => upstream,
            Err(UpstreamRefusal::Refused) => return problem(400, "Outline did not accept the sign-in; start again."),
            Err(UpstreamRefusal::Unreachable) => return problem(502, "Outline could not be reached; try again."),
        };
        match proxy.auth.ask_outline(upstream.key()) {
            Ok(user) => finish_sign_in(door, request_id, upstream, &user, base),
            Err(_) => problem(502, "Outline did not say who signed in; try again."),
        }
    }

    /// The sign-in ends without access: the client hears `access_denied`.
    fn declined(door: &FrontDoor, request_id: &str, pending: &Pending, base: &str, why: &str) -> Reply {
        door.grants.sign_ins.take_pending(request_id);
        lock(&door.signins).end(request_id);
        let params = [("error", "access_denied"), ("error_description", why)];
        let location = client_redirect(&pending.redirect_uri, &params, pending.state.as_deref(), base);
        Reply::Redirect { location, cookie: Some(signin::clear_cookie(request_id)) }
    }

    /// The person is known: a one-time code goes back to the client's redirect URI.
    fn finish_sign_in(
        door: &FrontDoor,
        request_id: &str,
        upstream: OutlineCredential,
        user: &User,
        base: &str,
    ) -> Reply {
        lock(&door.signins).end(request_id);
        let Some(pending) = door.grants.sign_ins.take_pending(request_id) else {
            return problem(400, "This sign-in has expired; start again from your app.");
        };
        let Ok(code) = door.grants.sign_ins.issue_code(&pending, SignedIn::new(upstream, user)) else {
            return problem(503, "The proxy could not finish the sign-in; try again.");
        };
        log::info!(
            "OAuth sign-in of user={} for client {}",
            crate::wire::log_value(&user.name),
            crate::wire::log_value(&pending.client_name)
        );
        let location = client_redirect(&pending.redirect_uri, &[("code", &code)], pending.state.as_deref(), base);
        Reply::Redirect { location, cookie: Some(signin::clear_cookie(request_id)) }
    }

    fn query_params(incoming: &Incoming) -> Result<HashMap<String, String>, &'static str> {
        let query = incoming.target.split_once('?').map(|(_, q)| q).unwrap_or("");
        single_valued(parse_form(query.as_bytes()))
    }

    /// The sign-in a form (with its copy of the cookie) or Outline's callback (the
    /// cookie alone) names, if it is alive and was started in this browser.
    fn sign_in_of(
        door: &FrontDoor,
        incoming: &Incoming,
        request_id: &str,
        form_csrf: Option<&str>,
    ) -> Result<Pending, Reply> {
        let Some(pending) = door.grants.sign_ins.pending(request_id) else {
            return Err(problem(400, "This sign-in has expired or was already used; start again from your app."));
        };
        let cookie =
            signin::cookie_value(cookie_headers(incoming), &signin::cookie_name(request_id)).unwrap_or_default();
        if !browser_owns(&cookie, form_csrf.unwrap_or(&cookie), &pending) {
            return Err(problem(403, "This sign-in was started in another browser; start again from your app."));
        }
        Ok(pending)
    }

    fn cookie_headers(incoming: &Incoming) -> impl Iterator<Item = &str> {
        incoming.headers.iter().filter(|(n, _)| n.eq_ignore_ascii_case("cookie")).map(|(_, v)| v.as_str())
    }

    /// The cookie set with the consent page and the form's copy agree with the sign-in.
    fn browser_owns(cookie: &str, form_csrf: &str, pending: &Pending) -> bool {
        let expected = pending.csrf_hash.as_bytes();
        !cookie.is_empty()
            && constant_time_eq(grants::token_hash(cookie).as_bytes(), expected)
            && constant_time_eq(grants::token_hash(form_csrf).as_bytes(), expected)
    }

    /// A browser's form post comes from this origin (Origin and Sec-Fetch-Site, when sent).
    fn same_origin(incoming: &Incoming, base: &str) -> bool {
        let origin_ok = incoming.header("origin").is_none_or(|o| o.trim().eq_ignore_ascii_case(base));
        let site_ok = incoming.header("sec-fetch-site").is_none_or(|s| matches!(s.trim(), "same-origin" | "none"));
        origin_ok && site_ok
    }

    /// The client's redirect URI with the answer added (and `state` and `iss`, RFC 9207).
    fn client_redirect(redirect_uri: &str, params: &[(&str, &str)], state: Option<&str>, base: &str) -> String {
        let issuer = format!("{base}{ISSUER_PATH}");
        let mut url = redirect_uri.to_string();
        let mut separator = if url.contains('?') { '&' } else { '?' };
        let all =
            params.iter().copied().chain(state.map(|s| ("state", s))).chain(std::iter::once(("iss", issuer.as_str())));
        for (name, value) in all {
            url.push(separator);
            url.push_str(name);
            url.push('=');
            url.push_str(&crate::util::percent_encode(value));
            separator = '&';
        }
        url
    }

    /// A form, refused when a parameter comes twice (RFC 6749 §3.1).
    fn single_valued(pairs: Vec<(String, String)>) -> Result<HashMap<String, String>, &'static str> {
        let mut map = HashMap::new();
        for (name, value) in pairs {
            if map.insert(name, value).is_some() {
                return Err("A parameter was given more than once.");
            }
        }
        Ok(map)
    }

    fn is_pkce_challenge(challenge: &str) -> bool {
        challenge.len() == 43 && challenge.bytes().all(|b| b.is_ascii_alphanumeric() || b == b'-' || b == b'_')
    }

    fn is_pkce_verifier(verifier: &str) -> bool {
        (43..=128).contains(&verifier.len())
            && verifier.bytes().all(|b| b.is_ascii_alphanumeric() || b"-._~".contains(&b))
    }

    pub fn pkce_challenge(verifier: &str) -> String {
        base64url(&Sha256::digest(verifier.as_bytes()))
    }

    /// `POST /oauth/token`: a code (with its PKCE verifier) or a refresh token for tokens.
    fn token(proxy: &Proxy, door: &FrontDoor, incoming: &Incoming, body: &[u8]) -> Reply {
        let form = match single_valued(parse_form(body)) {
            Ok(form) => form,
            Err(why) => return Reply::Error(oauth_error(400, "invalid_request", why)),
        };
        let grant_type = form.get("grant_type").map(String::as_str);
        if !matches!(grant_type, Some("authorization_code" | "refresh_token")) {
            return Reply::Error(match grant_type {
                Some(_) => {
                    oauth_error(400, "unsupported_grant_type", "Only authorization_code and refresh_token are offered.")
                }
                None => oauth_error(400, "invalid_request", "grant_type is required."),
            });
        }
        let client_id = match authenticate_client(door, incoming, &form) {
            Ok(Some(client_id)) => client_id,
            Ok(None) => return Reply::Error(oauth_error(400, "invalid_request", "client_id is required.")),
            Err(e) => return Reply::Error(e),
        };
        let result = match grant_type {
            Some("authorization_code") => redeem_code(door, &client_id, &form),
            Some("refresh_token") => refresh(proxy, door, &client_id, &form),
            Some(_) => Err(oauth_error(
                400,
                "unsupported_grant_type",
                "Only authorization_code and refresh_token are offered.",
            )),
            None => Err(oauth_error(400, "invalid_request", "grant_type is required.")),
        };
        match result {
            Ok(issued) => Reply::Json(
                200,
                json!({
                    "access_token": issued.access_token,
                    "token_type": "Bearer",
                    "expires_in": issued.expires_in,
                    "refresh_token": issued.refresh_token,
                    "scope": SCOPE,
                }),
            ),
            Err(e) => Reply::Error(e),
        }
    }

    /// Who calls the token or revocation endpoint: `client_id` in the form or HTTP
    /// Basic (RFC 6749 §2.3.1), with its secret when it registered as confidential.
    /// A public client is who it says: PKCE and the grant's binding to it do the rest.
    fn authenticate_client(
        door: &FrontDoor,
        incoming: &Incoming,
        form: &HashMap<String, String>,
    ) -> Result<Option<String>, OAuthError> {
        let basic = incoming.header("authorization").and_then(basic_credentials);
        let (client_id, secret) = match (basic, form.get("client_id")) {
            (Some((id, _)), Some(named)) if *named != id => {
                return Err(oauth_error(400, "invalid_request", "Two different client_ids were sent."))
            }
            (Some((id, secret)), _) => (id, Some(secret)),
            (None, Some(id)) => (id.clone(), form.get("client_secret").cloned()),
            (None, None) => return Ok(None),
        };
        let expected = door.grants.client(&client_id).and_then(|c| c.secret_hash);
        match (expected, secret) {
            (None, _) => Ok(Some(client_id)),
            (Some(hash), Some(secret)) if constant_time_eq(grants::token_hash(&secret).as_bytes(), hash.as_bytes()) => {
                Ok(Some(client_id))
            }
            (Some(_), _) => Err(oauth_error(401, "invalid_client", "The client's secret is missing or wrong.")),
        }
    }

    /// `Authorization: Basic base64(urlencode(id):urlencode(secret))`.
    fn basic_credentials(header: &str) -> Option<(String, String)> {
        let encoded = header.trim().strip_prefix("Basic ").or_else(|| header.trim().strip_prefix("basic "))?;
        let decoded = String::from_utf8(crate::util::base64_decode(encoded.trim())?).ok()?;
        let (id, secret) = decoded.split_once(':')?;
        Some((crate::util::percent_decode(id), crate::util::percent_decode(secret)))
    }

    fn required<'a>(form: &'a HashMap<String, String>, name: &str) -> Result<&'a str, OAuthError> {
        form.get(name)
            .map(String::as_str)
            .filter(|v| !v.is_empty())
            .ok_or_else(|| oauth_error(400, "invalid_request", &format!("{name} is required.")))
    }

    /// The code is spent whatever happens next; a wrong client, redirect URI, verifier
    /// or resource gets nothing.
    fn redeem_code(
        door: &FrontDoor,
        client_id: &str,
        form: &HashMap<String, String>,
    ) -> Result<grants::Issued, OAuthError> {
        let code_text = required(form, "code")?;
        let redirect_uri = required(form, "redirect_uri")?;
        let verifier = required(form, "code_verifier")?;
        let code = door.grants.take_code(code_text).map_err(refused)?;
        let wrong = |why: &str| Err(oauth_error(400, "invalid_grant", why));
        if code.client_id != client_id {
            return wrong("The code was issued to another client.");
        }
        if code.redirect_uri != redirect_uri {
            return wrong("The redirect_uri differs from the authorization request's.");
        }
        if !is_pkce_verifier(verifier)
            || !constant_time_eq(pkce_challenge(verifier).as_bytes(), code.code_challenge.as_bytes())
        {
            return wrong("The PKCE code_verifier does not match the code_challenge.");
        }
        if form.get("resource").is_some_and(|r| r.trim_end_matches('/') != code.resource) {
            return Err(oauth_error(400, "invalid_target", "The resource differs from the authorization request's."));
        }
        door.grants.create_grant(code_text, &code).map_err(refused)
    }

    /// A refresh token for new tokens (the old one retired), once Outline has said the
    /// grant's credential is still good: a revoked key or refused Outline token ends
    /// the grant (`invalid_grant`).
    fn refresh(
        proxy: &Proxy,
        door: &FrontDoor,
        client_id: &str,
        form: &HashMap<String, String>,
    ) -> Result<grants::Issued, OAuthError> {
        let refresh_token = required(form, "refresh_token")?;
        let opened = door.grants.open_with_refresh(refresh_token).map_err(refused)?;
        if opened.client_id != client_id {
            return Err(oauth_error(400, "invalid_grant", "The refresh token was issued to another client."));
        }
        if form.get("resource").is_some_and(|r| r.trim_end_matches('/') != opened.resource) {
            return Err(oauth_error(400, "invalid_target", "The refresh token is for another resource."));
        }
        let unavailable = || oauth_error(503, "temporarily_unavailable", "Outline could not be reached; try again.");
        let gone = |door: &FrontDoor, opened: &Opened, why: &str| match door.grants.revoke_grant(&opened.grant_id) {
            Ok(()) => oauth_error(400, "invalid_grant", why),
            // not revoked on disk: the client may try again, and is not told the grant is gone
            Err(e) => refused(e),
        };
        match (&opened.signed_in.credential, &door.outline_app) {
            (OutlineCredential::Outline { .. }, Some(_)) => {
                match renew_once(door, &opened.grant_id, RenewalFor::Refresh { refresh_token }) {
                    Ok(_) => {}
                    Err(UpstreamRefusal::Refused) => {
                        // the grant is revoked (by Outline's refusal, or a replay)
                        return Err(oauth_error(
                            400,
                            "invalid_grant",
                            "Outline no longer accepts this sign-in, or the grant was revoked; sign in again.",
                        ));
                    }
                    Err(UpstreamRefusal::Unreachable) => return Err(unavailable()),
                }
            }
            (OutlineCredential::Outline { .. }, None) => {
                return Err(gone(door, &opened, "Sign-in with Outline is no longer set up here; sign in again."))
            }
            (OutlineCredential::ApiKey { key }, _) => match proxy.auth.ask_outline(key) {
                Ok(_) => {}
                Err(ProxyError::Unauthorized(_)) => {
                    proxy.auth.forget(key);
                    return Err(gone(door, &opened, "Outline no longer accepts the API key of this sign-in."));
                }
                Err(_) => return Err(unavailable()),
            },
        }
        door.grants.rotate(&opened, refresh_token).map_err(refused)
    }

    /// `POST /oauth/revoke` (RFC 7009): the token's whole grant ends, and Outline's own
    /// tokens with it. Always 200: the client cannot act on anything else.
    fn revoke(door: &FrontDoor, incoming: &Incoming, body: &[u8]) -> Reply {
        let form: HashMap<String, String> = parse_form(body).into_iter().collect();
        // the token itself proves enough to end its grant; a client that names itself
        // must be itself (a confidential one with its secret)
        let caller = match authenticate_client(door, incoming, &form) {
            Ok(caller) => caller,
            Err(e) => return Reply::Error(e),
        };
        let token = form.get("token").map(String::as_str).unwrap_or("");
        if let Some(grant_id) = door.grants.grant_of(token) {
            let owner = door.grants.client_of(&grant_id);
            if caller.is_none_or(|c| Some(c) == owner) {
                let opened = door.grants.open_with_access(token).or_else(|_| door.grants.open_with_refresh(token));
                if let (Ok(opened), Some(app)) = (opened, &door.outline_app) {
                    if let OutlineCredential::Outline { refresh_token, .. } = &opened.signed_in.credential {
                        app.revoke(refresh_token);
                    }
                }
                if door.grants.revoke_grant(&grant_id).is_err() {
                    return Reply::Error(storage_error());
                }
                log::info!("OAuth grant revoked by its client");
            }
        }
        Reply::Json(200, json!({}))
    }

    #[cfg(test)]
    mod tests {
        use super::*;

        #[test]
        fn redirect_uris_https_loopback_or_an_apps_own_scheme() {
            for ok in [
                "https://claude.ai/api/mcp/auth_callback",
                "http://127.0.0.1:33418/callback",
                "http://localhost/cb",
                "http://[::1]:8080/",
                "cursor://anysphere.cursor-retrieval/oauth/callback",
            ] {
                assert!(check_redirect_uri(ok).is_ok(), "{ok}");
            }
            for bad in [
                "http://evil.example/cb",
                "http://127.0.0.1.evil.example/cb",
                "javascript:alert(1)",
                "data:text/html,x",
                "https://x.example/cb#frag",
                "https:///nohost",
                "https://user@x.example/cb",
                "",
                "no scheme",
            ] {
                assert!(check_redirect_uri(bad).is_err(), "{bad}");
            }
        }

        #[test]
        fn redirect_uris_a_browser_reads_with_another_host_are_refused() {
            for ok in [
                "https://App.Example.com:8443/cb",
                "https://127.0.0.1/cb",
                "https://[2001:db8::1]:443/cb",
                "myapp://x_y.z/cb",
            ] {
                assert!(check_redirect_uri(ok).is_ok(), "{ok}");
            }
            for (bad, why) in [
                ("https://attacker.example\\.claude.ai/cb", "backslash"),
                ("https://claude.ai\\@attacker.example/cb", "backslash"),
                ("https://claude.ai/cb\\x", "backslash"),
                ("https://claude.ai@attacker.example/cb", "user info"),
                ("https://claude.ai:x@attacker.example/cb", "user info"),
                ("myapp://claude.ai@attacker.example/cb", "user info"),
                ("https://cl\u{430}ude.ai/cb", "ASCII"),
                ("https://attacker.example%2f.claude.ai/cb", "letters, digits"),
                ("https://0x7f.1/cb", "a.b.c.d"),
                ("https://2130706433/cb", "a.b.c.d"),
                ("https://example.010/cb", "a.b.c.d"),
                ("https://[::1/cb", "]"),
                ("https://claude.ai:44x/cb", "port"),
            ] {
                let refused = check_redirect_uri(bad).expect_err(bad);
                assert!(refused.contains(why), "{bad}: {refused}");
            }
        }

        #[test]
        fn client_documents_come_from_public_addresses_only() {
            for public in ["93.184.216.34", "1.1.1.1", "2606:4700::1111", "::ffff:8.8.8.8"] {
                assert!(is_public_address(public.parse().unwrap()), "{public}");
            }
            for private in [
                "127.0.0.1",
                "10.1.2.3",
                "172.16.0.1",
                "192.168.1.1",
                "169.254.169.254",
                "100.64.0.1",
                "0.0.0.0",
                "224.0.0.1",
                "255.255.255.255",
                "::1",
                "::",
                "fd00::1",
                "fe80::1",
                "::ffff:127.0.0.1",
                "::ffff:169.254.169.254",
            ] {
                assert!(!is_public_address(private.parse().unwrap()), "{private}");
            }
        }

        #[test]
        fn loopback_redirects_match_on_any_port_and_nothing_else_does() {
            let registered = vec!["http://127.0.0.1/callback".to_string(), "https://app.example/cb".to_string()];
            assert!(redirect_matches(&registered, "http://127.0.0.1:5555/callback"));
            assert!(redirect_matches(&registered, "https://app.example/cb"));
            assert!(!redirect_matches(&registered, "http://127.0.0.1:5555/other"));
            assert!(!redirect_matches(&registered, "http://localhost:5555/callback"));
            assert!(!redirect_matches(&registered, "https://app.example:444/cb"));
            assert!(!redirect_matches(&registered, "https://app.example/cb?x=1"));
        }

        #[test]
        fn pkce_s256_as_another_implementation_computes_it() {
            // the challenge from Python's hashlib and base64.urlsafe_b64encode
            assert_eq!(
                pkce_challenge("dBjftJeZ4CVP-mJ92IVTZjAv5-MsqGMPULsfA_HeU9Lkg"),
                "weT7jpLfnmcUBrkBS5hC2R_WPDK5VF-6iXWS3fG4MlU"
            );
        }
    }
}

mod signin {
    //! Owns the person's step of an OAuth sign-in: the consent page (with the API-key
    //! field when no Outline OAuth app is set), its cookie and anti-framing headers, and
    //! the proxy's own OAuth client of Outline (authorize, token, refresh, revoke) with
    //! its PKCE verifiers keyed by a secret in the state directory.
    //! Calls `grants` (the OutlineCredential type), `auth` (Outline's HTTP client, ureq error
    //! words), `util`, ureq.
    use crate::auth::describe_ureq_error;
    use crate::grants::OutlineCredential;
    use crate::util::{base64url, lock, now_unix, percent_encode};
    use hkdf::hmac::{Hmac, Mac};
    use serde_json::Value;
    use sha2::Sha256;
    use std::path::PathBuf;
    use std::sync::Mutex;

    /// The proxy's secret for the PKCE verifiers it sends Outline, in the state directory.
    pub const SIGNIN_KEY_FILE: &str = "oauth-signin.key";

    /// Outline's OAuth app, as the operator registered it (OUTLINE_OAUTH_CLIENT_ID and
    /// OUTLINE_OAUTH_CLIENT_SECRET).
    pub struct OutlineApp {
        outline_url: String,
        client_id: String,
        client_secret: String,
        scope: String,
        agent: ureq::Agent,
        /// Where SIGNIN_KEY_FILE is kept (None: a key in memory for this run).
        key_dir: Option<PathBuf>,
        /// The key, once read or made.
        key: Mutex<Option<[u8; 32]>>,
    }

    /// Why Outline did not give (or renew) its tokens.
    #[derive(Clone, Copy, Debug, PartialEq)]
    pub enum UpstreamRefusal {
        /// Outline refused: the code, or the refresh token, is no longer good.
        Refused,
        Unreachable,
    }

    impl OutlineApp {
        pub fn new(outline_url: &str, client_id: &str, client_secret: &str, scope: &str) -> OutlineApp {
            OutlineApp {
                outline_url: outline_url.to_string(),
                client_id: client_id.to_string(),
                client_secret: client_secret.to_string(),
                scope: scope.to_string(),
                agent: crate::auth::outline_agent(),
                key_dir: None,
                key: Mutex::new(None),
            }
        }

        /// The app with its verifier key kept in `dir` (MCP_PROXY_STATE_DIR), so a
        /// sign-in in progress survives a restart.
        pub fn keeping_key_in(mut self, dir: Option<PathBuf>) -> OutlineApp {
            self.key_dir = dir;
            self
        }

        /// The PKCE verifier of the proxy's own request to Outline for a sign-in:
        /// HMAC-SHA256 of the sign-in's id under the proxy's secret key, so the id (which
        /// travels in the callback URL, next to Outline's code) does not give it. Never
        /// stored. None when the key can be neither read nor made.
        pub fn verifier(&self, request_id: &str) -> Option<String> {
            let key = self.key()?;
            let mut mac = Hmac::<Sha256>::new_from_slice(&key).ok()?;
            mac.update(request_id.as_bytes());
            Some(base64url(&mac.finalize().into_bytes()))
        }

        /// The key: read from SIGNIN_KEY_FILE, or made there (mode 0600) on first use.
        fn key(&self) -> Option<[u8; 32]> {
            let mut key = lock(&self.key);
            if key.is_none() {
                match crate::util::kept_key(self.key_dir.as_deref(), SIGNIN_KEY_FILE) {
                    Ok(made) => *key = Some(made),
                    Err(e) => log::error!("cannot read or make the sign-in key {SIGNIN_KEY_FILE}: {e}"),
                }
            }
            *key
        }

        /// Where the browser goes to sign in at Outline (no secret in it).
        pub fn authorize_url(&self, callback: &str, state: &str, challenge: &str) -> String {
            format!(
                "{}/oauth/authorize?response_type=code&client_id={}&redirect_uri={}&state={}&scope={}&code_challenge={}&code_challenge_method=S256",
                self.outline_url,
                percent_encode(&self.client_id),
                percent_encode(callback),
                percent_encode(state),
                percent_encode(&self.scope),
                percent_encode(challenge),
            )
        }

        /// Outline's code → Outline's tokens (`POST /oauth/token`, the secret in the body).
        pub fn exchange(
            &self,
            code: &str,
            callback: &str,
            verifier: &str,
        ) -> Result<OutlineCredential, UpstreamRefusal> {
            self.token_request(&[
                ("grant_type", "authorization_code"),
                ("code", code),
                ("redirect_uri", callback),
                ("code_verifier", verifier),
            ])
        }

        /// New tokens for old: Outline rotates its refresh token on every use.
        pub fn refresh(&self, refresh_token: &str) -> Result<OutlineCredential, UpstreamRefusal> {
            self.token_request(&[("grant_type", "refresh_token"), ("refresh_token", refresh_token)])
        }

        /// Whether Outline knows the app: a refresh with a made-up token is refused as
        /// `invalid_client` (401) when the id or secret is wrong, as a bad grant (400)
        /// when they are right (clients are authenticated first).
        pub fn credentials_accepted(&self) -> Result<bool, UpstreamRefusal> {
            let url = format!("{}/oauth/token", self.outline_url);
            let form = [
                ("grant_type", "refresh_token"),
                ("refresh_token", "outline-mcp-proxy-check"),
                ("client_id", self.client_id.as_str()),
                ("client_secret", self.client_secret.as_str()),
            ];
            let response = self.agent.post(&url).send_form(form).map_err(|_| UpstreamRefusal::Unreachable)?;
            match response.status().as_u16() {
                400 => Ok(true),
                401 => Ok(false),
                _ => Err(UpstreamRefusal::Unreachable),
            }
        }

        /// Tells Outline a token is no longer wanted (best effort: RFC 7009 answers 200).
        pub fn revoke(&self, token: &str) {
            let url = format!("{}/oauth/revoke", self.outline_url);
            let form = [("token", token), ("client_id", &self.client_id), ("client_secret", &self.client_secret)];
            if let Err(e) = self.agent.post(&url).send_form(form) {
                log::warn!("Outline /oauth/revoke failed: {}", describe_ureq_error(&e));
            }
        }

        fn token_request(&self, params: &[(&str, &str)]) -> Result<OutlineCredential, UpstreamRefusal> {
            let url = format!("{}/oauth/token", self.outline_url);
            let mut form: Vec<(&str, &str)> = params.to_vec();
            form.push(("client_id", &self.client_id));
            form.push(("client_secret", &self.client_secret));
            let mut response =
                self.agent.post(&url).header("Accept", "application/json").send_form(form).map_err(|e| {
                    log::warn!("Outline /oauth/token failed: {}", describe_ureq_error(&e));
                    UpstreamRefusal::Unreachable
                })?;
            let status = response.status().as_u16();
            if status == 400 || status == 401 {
                return Err(UpstreamRefusal::Refused);
            }
            if status != 200 {
                log::warn!("Outline /oauth/token answered {status}");
                return Err(UpstreamRefusal::Unreachable);
            }
            let body = response
                .body_mut()
                .with_config()
                .limit(64 * 1024)
                .read_to_string()
                .map_err(|_| UpstreamRefusal::Unreachable)?;
            parse_outline_tokens(&body).ok_or_else(|| {
                log::warn!("Outline /oauth/token answered without tokens");
                UpstreamRefusal::Unreachable
            })
        }
    }

    /// `{"access_token","refresh_token","expires_in",...}` → the upstream credential.
    pub fn parse_outline_tokens(body: &str) -> Option<OutlineCredential> {
        let value: Value = serde_json::from_str(body).ok()?;
        let text = |k: &str| value.get(k).and_then(Value::as_str).filter(|s| !s.is_empty()).map(str::to_string);
        let expires_in = value.get("expires_in").and_then(Value::as_u64).unwrap_or(3600);
        Some(OutlineCredential::Outline {
            access_token: text("access_token")?,
            refresh_token: text("refresh_token")?,
            expires_at: now_unix() + expires_in,
        })
    }

    /// What the consent page shows and carries.
    pub struct Page<'a> {
        pub client_name: &'a str,
        pub redirect_host: &'a str,
        pub request_id: &'a str,
        pub csrf: &'a str,
        /// The API-key field (no Outline OAuth app), or a button to Outline.
        pub asks_for_key: bool,
        pub error: Option<&'a str>,
    }

    pub fn html_escape(text: &str) -> String {
        let mut out = String::with_capacity(text.len());
        for c in text.chars() {
            match c {
                '&' => out.push_str("&amp;"),
                '<' => out.push_str("&lt;"),
                '>' => out.push_str("&gt;"),
                '"' => out.push_str("&quot;"),
                '\'' => out.push_str("&#39;"),
                c if c.is_control() => {}
                c => out.push(c),
            }
        }
        out
    }

    pub fn consent_page(page: &Page) -> String {
        let client = html_escape(page.client_name);
        let host = html_escape(page.redirect_host);
        let error =
            page.error.map(|e| format!("<p class=\"error\" role=\"alert\">{}</p>", html_escape(e))).unwrap_or_default();
        let field = if page.asks_for_key {
            "<label for=\"api_key\">Your Outline API key</label>\n\
             <input id=\"api_key\" name=\"api_key\" type=\"password\" autocomplete=\"off\" spellcheck=\"false\" required autofocus>\n\
             <p class=\"hint\">Make one in Outline under <em>Settings → API &amp; Apps</em>. It is checked with Outline, \
             stored only encrypted, and never appears in an address or a log.</p>\n\
             <button type=\"submit\" name=\"action\" value=\"allow\">Connect</button>"
        } else {
            "<p class=\"hint\">You will sign in with your Outline account and come back here.</p>\n\
             <button type=\"submit\" name=\"action\" value=\"allow\">Continue with Outline</button>"
        };
        format!(
            "<!doctype html>\n<html lang=\"en\"><head><meta charset=\"utf-8\">\
             <meta name=\"viewport\" content=\"width=device-width,initial-scale=1\">\
             <meta name=\"referrer\" content=\"same-origin\"><title>Connect {client} to Outline</title>\
             <style>{STYLE}</style></head>\n<body><main>\n\
             <h1>Connect <span id=\"client\">{client}</span> to Outline</h1>\n\
             <p><strong>{client}</strong> asks to read and edit your Outline documents as you. \
             When you connect, you go back to <strong id=\"redirect-host\">{host}</strong>.</p>\n{error}\n\
             <form method=\"post\" action=\"/oauth/authorize\">\n\
             <input type=\"hidden\" name=\"request\" value=\"{}\"><input type=\"hidden\" name=\"csrf\" value=\"{}\">\n\
             {field}\n<button type=\"submit\" name=\"action\" value=\"deny\" class=\"secondary\" formnovalidate>Cancel</button>\n\
             </form>\n<p class=\"small\">If you did not start this, close this page.</p>\n</main></body></html>\n",
            html_escape(page.request_id),
            html_escape(page.csrf),
        )
    }

    /// A page for a sign-in that cannot go on (and cannot be sent back to the client).
    pub fn problem_page(message: &str) -> String {
        format!(
            "<!doctype html>\n<html lang=\"en\"><head><meta charset=\"utf-8\"><title>Cannot connect to Outline</title>\
             <style>{STYLE}</style></head>\n<body><main><h1>Cannot connect to Outline</h1>\n\
             <p class=\"error\" role=\"alert\">{}</p></main></body></html>\n",
            html_escape(message)
        )
    }

    const STYLE: &str = "body{font:16px/1.5 system-ui,sans-serif;background:#f4f5f7;color:#111;margin:0}\
        main{max-width:28rem;margin:4rem auto;background:#fff;padding:2rem;border-radius:12px;box-shadow:0 2px 12px #0002}\
        h1{font-size:1.3rem;margin-top:0}label{display:block;font-weight:600;margin:1rem 0 .3rem}\
        input[type=password]{width:100%;box-sizing:border-box;padding:.6rem;font:inherit;border:1px solid #bbb;border-radius:6px}\
        button{font:inherit;padding:.6rem 1.2rem;border-radius:6px;border:0;background:#0366d6;color:#fff;margin:1rem .5rem 0 0;cursor:pointer}\
        button.secondary{background:#e4e6ea;color:#111}.hint,.small{color:#555;font-size:.9rem}.error{color:#b00020;font-weight:600}";

    /// Headers of every page of the sign-in: not cached, not framed (clickjacking),
    /// no referrer sent to other sites, nothing loaded from elsewhere.
    pub fn page_headers() -> Vec<(String, String)> {
        [
            ("Content-Type", "text/html; charset=utf-8"),
            ("Cache-Control", "no-store"),
            ("X-Frame-Options", "DENY"),
            (
                "Content-Security-Policy",
                "default-src 'none'; style-src 'unsafe-inline'; frame-ancestors 'none'; base-uri 'none'",
            ),
            ("Referrer-Policy", "same-origin"),
            ("X-Content-Type-Options", "nosniff"),
        ]
        .iter()
        .map(|(n, v)| (n.to_string(), v.to_string()))
        .collect()
    }

    /// The cookie that ties a sign-in to the browser that started it (double submit:
    /// the form carries the same value; another site can neither read nor set it).
    pub fn cookie_name(request_id: &str) -> String {
        format!("omp_signin_{}", request_id.chars().rev().take(12).collect::<String>())
    }

    pub fn set_cookie(request_id: &str, csrf: &str, secure: bool) -> String {
        format!(
            "{}={csrf}; Path=/oauth; Max-Age=600; HttpOnly; SameSite=Lax{}",
            cookie_name(request_id),
            if secure { "; Secure" } else { "" }
        )
    }

    pub fn clear_cookie(request_id: &str) -> String {
        format!("{}=; Path=/oauth; Max-Age=0; HttpOnly; SameSite=Lax", cookie_name(request_id))
    }

    /// A cookie's value from the request's Cookie headers.
    pub fn cookie_value<'a>(cookie_headers: impl Iterator<Item = &'a str>, name: &str) -> Option<String> {
        cookie_headers
            .flat_map(|h| h.split(';'))
            .filter_map(|pair| pair.trim().split_once('='))
            .find(|(n, _)| *n == name)
            .map(|(_, v)| v.to_string())
    }
}

mod grants {
    //! Owns what OAuth sign-in leaves behind: registered clients, sign-ins in progress,
    //! authorization codes, and grants with their tokens, kept only as sha256 hashes. A
    //! grant's Outline credential is sealed (XChaCha20-Poly1305) under a random key that
    //! is itself stored only wrapped under keys derived (HKDF-SHA256) from the client's
    //! tokens: the state file without a token reveals no credential. Changes reach disk
    //! through one writer thread: a journal, compacted into the state file. Calls `util`, std.
    use crate::auth::{User, TOKEN_PREFIX};
    use crate::util::{base64url, lock, now_unix};
    use chacha20poly1305::aead::{Aead, KeyInit, Payload};
    use chacha20poly1305::{XChaCha20Poly1305, XNonce};
    use serde::{Deserialize, Serialize};
    use sha2::{Digest, Sha256};
    use std::collections::HashMap;
    use std::io::{Read, Write};
    use std::path::PathBuf;
    use std::sync::{mpsc, Mutex};
    use std::thread;
    use std::time::{Duration, Instant};

    const STATE_FILE: &str = "oauth-grants.json";
    /// Changes since the state file was written, one JSON line each, appended.
    const JOURNAL_FILE: &str = "oauth-grants.journal";
    /// The journal is folded into the state file once it is this many times the live state.
    const COMPACT_FACTOR: u64 = 2;
    /// Live grants per user and client: a new one revokes the oldest.
    pub const GRANTS_PER_CLIENT: usize = 10;
    /// Live grants per user over all clients: a new one revokes the oldest.
    pub const GRANTS_PER_USER: usize = 100;
    /// Old refresh tokens remembered per grant: one presented again means it leaked.
    const RETIRED_KEPT: usize = 8;
    /// Access tokens alive at once per grant (a refresh does not cut requests in flight).
    const ACCESS_KEPT: usize = 4;
    /// Sign-ins in progress at once.
    const MAX_PENDING: usize = 10_000;

    /// What the container is given: a pasted API key, or Outline's own OAuth tokens.
    #[derive(Serialize, Deserialize, Clone, Debug, PartialEq)]
    #[serde(tag = "kind", rename_all = "snake_case")]
    pub enum OutlineCredential {
        ApiKey { key: String },
        Outline { access_token: String, refresh_token: String, expires_at: u64 },
    }

    impl OutlineCredential {
        /// The key sent to Outline and to the container as `x-outline-api-key`.
        pub fn key(&self) -> &str {
            match self {
                OutlineCredential::ApiKey { key } => key,
                OutlineCredential::Outline { access_token, .. } => access_token,
            }
        }
    }

    /// Who signed in, and their Outline credential: what a grant's sealed box holds,
    /// opened (sealed at rest as JSON, the field names as they always were).
    #[derive(Serialize, Deserialize, Clone, Debug)]
    pub struct SignedIn {
        #[serde(rename = "upstream")]
        pub credential: OutlineCredential,
        pub user_id: String,
        pub team_id: String,
        pub name: String,
        pub email: String,
    }

    impl SignedIn {
        pub fn new(credential: OutlineCredential, user: &User) -> SignedIn {
            SignedIn {
                credential,
                user_id: user.id.clone(),
                team_id: user.team_id.clone(),
                name: user.name.clone(),
                email: user.email.clone(),
            }
        }
    }

    /// A client allowed to ask for sign-ins: registered (RFC 7591) or described by
    /// its own metadata document (its `id` is that document's URL).
    #[derive(Serialize, Deserialize, Clone, Debug)]
    pub struct Client {
        pub id: String,
        pub name: String,
        pub redirect_uris: Vec<String>,
        pub created_at: u64,
        /// sha256 of its secret, for a client that registered as confidential
        /// (`client_secret_post` or `client_secret_basic`); none for public clients.
        #[serde(default)]
        pub secret_hash: Option<String>,
    }

    /// A sign-in between the authorize request and the person's answer. Nothing in it
    /// is secret (the CSRF value is a hash; the PKCE verifier of the proxy's own
    /// request to Outline is derived from the sign-in's id): it is written to the
    /// state file when the proxy stops, so a page left open across a restart still works.
    #[derive(Clone, Debug, Serialize, Deserialize)]
    pub struct Pending {
        pub client_id: String,
        pub client_name: String,
        pub redirect_uri: String,
        pub state: Option<String>,
        pub code_challenge: String,
        pub resource: String,
        pub csrf_hash: String,
        pub attempts: u32,
        pub expires_at: u64,
    }

    /// An authorization code, opened with the code itself.
    pub struct Code {
        pub client_id: String,
        pub redirect_uri: String,
        pub code_challenge: String,
        pub resource: String,
        pub signed_in: SignedIn,
    }

    /// An authorization code as kept: its `SignedIn` sealed under a key derived from the
    /// code, so it too can be written when the proxy stops without a secret in the clear.
    #[derive(Clone, Debug, Serialize, Deserialize)]
    struct CodeRecord {
        client_id: String,
        redirect_uri: String,
        code_challenge: String,
        resource: String,
        sealed: String,
        expires_at: u64,
    }

    #[derive(Serialize, Deserialize, Clone, Debug)]
    struct TokenRecord {
        hash: String,
        /// The grant's key, sealed under a key derived from this token.
        wrapped_key: String,
        expires_at: u64,
    }

    #[derive(Serialize, Deserialize, Clone, Debug)]
    struct GrantRecord {
        id: String,
        client_id: String,
        resource: String,
        /// `SignedIn`, as JSON, sealed under the grant's key.
        sealed: String,
        refresh: TokenRecord,
        access: Vec<TokenRecord>,
        retired_refresh: Vec<String>,
        created_at: u64,
        /// sha256 of the Outline team and user the grant is for (for the limits per user).
        #[serde(default)]
        user: String,
    }

    #[derive(Serialize, Deserialize, Default)]
    struct StateFile {
        version: u32,
        clients: Vec<Client>,
        grants: Vec<GrantRecord>,
        /// Sign-ins and codes in progress when the proxy stopped (by id hash, code hash).
        #[serde(default)]
        sign_ins: Vec<(String, Pending)>,
        #[serde(default)]
        codes: Vec<(String, CodeRecord)>,
    }

    /// Tokens as issued to a client: shown once, then kept only as hashes.
    pub struct Issued {
        pub access_token: String,
        pub refresh_token: String,
        pub expires_in: u64,
    }

    /// A grant opened with one of its tokens.
    pub struct Opened {
        pub grant_id: String,
        pub client_id: String,
        pub resource: String,
        pub signed_in: SignedIn,
        key: [u8; 32],
    }

    #[derive(Debug, PartialEq)]
    pub enum TokenRefused {
        /// Unknown, expired, revoked or for another client: the client signs in again.
        InvalidGrant(&'static str),
        /// A refresh token presented a second time: the whole grant is revoked.
        Replayed,
        /// The store could not be written or read: nothing changed.
        Storage,
        /// MCP_PROXY_OAUTH_MAX_CLIENTS clients are registered and each has a live grant.
        Full,
    }

    /// Registered clients and live grants, with the indexes that find a grant by token,
    /// user and client. Every change to it is also handed to the journal (`Keeping`).
    #[derive(Default)]
    struct Ledger {
        clients: HashMap<String, Client>,
        grants: HashMap<String, GrantRecord>,
        /// token hash → grant id (access and refresh tokens alike)
        tokens: HashMap<String, String>,
        /// retired refresh token hash → grant id
        retired: HashMap<String, String>,
        /// user hash → the user's grant ids, oldest first
        by_user: HashMap<String, Vec<String>>,
        /// client id → its live grants (a client without any is unused)
        per_client: HashMap<String, usize>,
    }

    impl Ledger {
        fn index_tokens(&mut self, grant: &GrantRecord) {
            self.tokens.insert(grant.refresh.hash.clone(), grant.id.clone());
            for access in &grant.access {
                self.tokens.insert(access.hash.clone(), grant.id.clone());
            }
            for retired in &grant.retired_refresh {
                self.retired.insert(retired.clone(), grant.id.clone());
            }
        }

        fn unindex_tokens(&mut self, grant: &GrantRecord) {
            self.tokens.remove(&grant.refresh.hash);
            for access in &grant.access {
                self.tokens.remove(&access.hash);
            }
            for retired in &grant.retired_refresh {
                self.retired.remove(retired);
            }
        }

        /// A grant kept: its tokens found, and counted for its user (newest last) and client.
        fn add_grant(&mut self, grant: GrantRecord) {
            self.index_tokens(&grant);
            *self.per_client.entry(grant.client_id.clone()).or_default() += 1;
            if !grant.user.is_empty() {
                self.by_user.entry(grant.user.clone()).or_default().push(grant.id.clone());
            }
            self.grants.insert(grant.id.clone(), grant);
        }

        fn remove_grant(&mut self, id: &str) -> Option<GrantRecord> {
            let grant = self.grants.remove(id)?;
            self.unindex_tokens(&grant);
            if let Some(count) = self.per_client.get_mut(&grant.client_id) {
                *count = count.saturating_sub(1);
                if *count == 0 {
                    self.per_client.remove(&grant.client_id);
                }
            }
            if let Some(ids) = self.by_user.get_mut(&grant.user) {
                ids.retain(|g| g != id);
                if ids.is_empty() {
                    self.by_user.remove(&grant.user);
                }
            }
            Some(grant)
        }

        /// A new grant kept, and the user's oldest grants for this client, then over all,
        /// ended where they are beyond the limits: the changes for the journal.
        fn add_grant_within_limits(&mut self, grant: GrantRecord) -> Vec<Entry> {
            let (user, client_id) = (grant.user.clone(), grant.client_id.clone());
            self.add_grant(grant);
            let over = self.over_limits(&user, &client_id);
            if !over.is_empty() {
                log::info!("a new OAuth grant ended {} older one(s) of its user (the limits per user)", over.len());
            }
            over.into_iter()
                .map(|id| {
                    self.remove_grant(&id);
                    Entry::GrantGone { id }
                })
                .collect()
        }

        /// Forgets grants whose refresh token is dead, clients unused for a day, and
        /// expired access tokens (those in memory only): the changes for the journal.
        fn expire(&mut self, now: u64) -> Vec<Entry> {
            let dead: Vec<String> =
                self.grants.values().filter(|g| g.refresh.expires_at <= now).map(|g| g.id.clone()).collect();
            let mut entries = Vec::new();
            for id in dead {
                self.remove_grant(&id);
                entries.push(Entry::GrantGone { id });
            }
            let unused: Vec<String> = self
                .clients
                .values()
                .filter(|c| !self.per_client.contains_key(&c.id) && c.created_at + 86400 <= now)
                .map(|c| c.id.clone())
                .collect();
            for id in unused {
                self.clients.remove(&id);
                entries.push(Entry::ClientGone { id });
            }
            let mut expired_access = Vec::new();
            for grant in self.grants.values_mut() {
                grant.access.retain(|a| {
                    let alive = a.expires_at > now;
                    if !alive {
                        expired_access.push(a.hash.clone());
                    }
                    alive
                });
            }
            for hash in &expired_access {
                self.tokens.remove(hash);
            }
            entries
        }

        /// A user's grants beyond the limits, oldest first: those over GRANTS_PER_CLIENT
        /// for this client, then those over GRANTS_PER_USER in all.
        fn over_limits(&self, user: &str, client_id: &str) -> Vec<String> {
            let Some(ids) = self.by_user.get(user) else { return Vec::new() };
            let of_client: Vec<&String> =
                ids.iter().filter(|id| self.grants.get(*id).is_some_and(|g| g.client_id == client_id)).collect();
            let mut over: Vec<String> = of_client
                .iter()
                .take(of_client.len().saturating_sub(GRANTS_PER_CLIENT))
                .map(|id| (*id).clone())
                .collect();
            let still_over = (ids.len() - over.len()).saturating_sub(GRANTS_PER_USER);
            let oldest_others: Vec<String> =
                ids.iter().filter(|id| !over.contains(id)).take(still_over).cloned().collect();
            over.extend(oldest_others);
            over
        }

        /// Room for one more registered client: the oldest unused ones dropped, as few
        /// as needed; none when every client has a live grant.
        fn make_room_for_client(&mut self, max: usize) -> Result<Vec<String>, TokenRefused> {
            if self.clients.len() < max {
                return Ok(Vec::new());
            }
            let mut unused: Vec<(u64, String)> = self
                .clients
                .values()
                .filter(|c| !self.per_client.contains_key(&c.id))
                .map(|c| (c.created_at, c.id.clone()))
                .collect();
            let needed = self.clients.len() + 1 - max;
            if unused.len() < needed {
                return Err(TokenRefused::Full);
            }
            unused.sort();
            let dropped: Vec<String> = unused.into_iter().take(needed).map(|(_, id)| id).collect();
            for id in &dropped {
                self.clients.remove(id);
            }
            Ok(dropped)
        }
    }

    /// Kept in memory only, and written when the proxy stops: sign-ins in progress,
    /// codes not yet redeemed, and redeemed codes (remembered to catch a second use).
    #[derive(Default)]
    struct InProgress {
        pending: HashMap<String, Pending>,
        codes: HashMap<String, CodeRecord>,
        /// used code hash → (what became of it; when the memory may go)
        used_codes: HashMap<String, (UsedCode, Instant)>,
    }

    /// A code taken for good. A second use may come while the first is still being
    /// turned into a grant: it is noted, and the grant is revoked as soon as it is made.
    enum UsedCode {
        Redeeming { replayed: bool },
        Granted(String),
    }

    /// Sign-ins (by id hash) and codes (by code hash) as the state file keeps them.
    type InProgressAtRest = (Vec<(String, Pending)>, Vec<(String, CodeRecord)>);

    /// Sign-ins between the authorize request and the person's answer, and the
    /// one-time codes they end in.
    pub struct SignIns(Mutex<InProgress>);

    impl SignIns {
        /// Remembers a sign-in in progress; at most MAX_PENDING at once (each lives ten
        /// minutes), so a flood of authorize requests cannot grow memory without end.
        pub fn add_pending(&self, id: &str, pending: Pending) -> Result<(), TokenRefused> {
            let mut state = lock(&self.0);
            if state.pending.len() >= MAX_PENDING {
                let now = now_unix();
                state.pending.retain(|_, p| p.expires_at > now);
            }
            if state.pending.len() >= MAX_PENDING {
                return Err(TokenRefused::Storage);
            }
            state.pending.insert(token_hash(id), pending);
            Ok(())
        }

        pub fn pending(&self, id: &str) -> Option<Pending> {
            let state = lock(&self.0);
            state.pending.get(&token_hash(id)).filter(|p| p.expires_at > now_unix()).cloned()
        }

        /// Counts a failed attempt (a wrong key); after five the sign-in is over.
        pub fn count_attempt(&self, id: &str) -> u32 {
            let mut state = lock(&self.0);
            let hash = token_hash(id);
            let attempts = state.pending.get_mut(&hash).map(|p| {
                p.attempts += 1;
                p.attempts
            });
            match attempts {
                Some(n) if n < 5 => n,
                _ => {
                    state.pending.remove(&hash);
                    5
                }
            }
        }

        pub fn take_pending(&self, id: &str) -> Option<Pending> {
            lock(&self.0).pending.remove(&token_hash(id)).filter(|p| p.expires_at > now_unix())
        }

        /// A one-time code for a finished sign-in, valid for a minute.
        pub fn issue_code(&self, pending: &Pending, signed_in: SignedIn) -> Result<String, TokenRefused> {
            let code = new_secret("ac")?;
            let plaintext = serde_json::to_vec(&signed_in).map_err(|_| TokenRefused::Storage)?;
            let entry = CodeRecord {
                client_id: pending.client_id.clone(),
                redirect_uri: pending.redirect_uri.clone(),
                code_challenge: pending.code_challenge.clone(),
                resource: pending.resource.clone(),
                sealed: seal(&token_key(&code, "code"), "code", &plaintext)?,
                expires_at: now_unix() + 60,
            };
            lock(&self.0).codes.insert(token_hash(&code), entry);
            Ok(code)
        }

        /// Takes a waiting code for good (it is remembered as used); `None` when no such
        /// code waits (unknown, or used before).
        fn take_code(&self, code: &str) -> Option<Result<Code, TokenRefused>> {
            let hash = token_hash(code);
            let mut state = lock(&self.0);
            let entry = state.codes.remove(&hash)?;
            let used = UsedCode::Redeeming { replayed: false };
            state.used_codes.insert(hash, (used, Instant::now() + Duration::from_secs(660)));
            if entry.expires_at <= now_unix() {
                return Some(Err(TokenRefused::InvalidGrant("The authorization code has expired.")));
            }
            let opened = open(&token_key(code, "code"), "code", &entry.sealed)
                .and_then(|plaintext| serde_json::from_slice::<SignedIn>(&plaintext).ok())
                .ok_or(TokenRefused::InvalidGrant("The authorization code does not open."));
            Some(opened.map(|signed_in| Code {
                client_id: entry.client_id,
                redirect_uri: entry.redirect_uri,
                code_challenge: entry.code_challenge,
                resource: entry.resource,
                signed_in,
            }))
        }

        /// A second use of a used code: the grant its first use was given, if issued
        /// yet; if not, the replay is noted for `note_grant_of_code` to find.
        fn replay_of_used_code(&self, code: &str) -> Option<String> {
            match lock(&self.0).used_codes.get_mut(&token_hash(code)) {
                Some((UsedCode::Granted(grant_id), _)) => Some(grant_id.clone()),
                Some((UsedCode::Redeeming { replayed }, _)) => {
                    *replayed = true;
                    None
                }
                None => None,
            }
        }

        /// Remembers which grant a used code gave (so a second use revokes it); true if
        /// a second use came meanwhile (then the grant must be revoked at once).
        fn note_grant_of_code(&self, code: &str, grant_id: &str) -> bool {
            match lock(&self.0).used_codes.get_mut(&token_hash(code)) {
                Some((used, _)) => {
                    let replayed = matches!(used, UsedCode::Redeeming { replayed: true });
                    *used = UsedCode::Granted(grant_id.to_string());
                    replayed
                }
                None => false,
            }
        }

        fn prune(&self, now: u64) {
            let mut state = lock(&self.0);
            let instant = Instant::now();
            state.pending.retain(|_, p| p.expires_at > now);
            state.codes.retain(|_, c| c.expires_at > now);
            state.used_codes.retain(|_, (_, until)| *until > instant);
        }

        /// The sign-ins and codes in progress, as written at a stop.
        fn in_progress(&self) -> InProgressAtRest {
            let state = lock(&self.0);
            (
                state.pending.iter().map(|(h, p)| (h.clone(), p.clone())).collect(),
                state.codes.iter().map(|(h, c)| (h.clone(), c.clone())).collect(),
            )
        }
    }

    /// One change to what is kept at rest: one line of the journal.
    #[derive(Serialize, Deserialize, Clone, Debug)]
    #[serde(tag = "op", rename_all = "snake_case")]
    enum Entry {
        Client { client: Client },
        ClientGone { id: String },
        Grant { grant: GrantRecord },
        GrantGone { id: String },
    }

    /// What the writer thread is sent.
    enum ToWriter {
        /// Changes in the order they were made; `done` hears whether they are on disk.
        Changes(Vec<Entry>, mpsc::Sender<bool>),
        /// The proxy stops: the state file written whole, with the sign-ins and codes.
        Stop { sign_ins: Vec<(String, Pending)>, codes: Vec<(String, CodeRecord)>, done: mpsc::Sender<bool> },
    }

    /// Where the store's changes go.
    enum Keeping {
        /// No state directory: grants live as long as the process.
        InMemory,
        OnDisk {
            mailbox: mpsc::Sender<ToWriter>,
            thread: Mutex<Option<thread::JoinHandle<()>>>,
        },
        /// The journal could not be opened at start: every change is refused (503).
        Unwritable,
    }

    /// Changes handed to the writer, not yet known to be on disk.
    enum Durable {
        Nothing,
        Waiting(mpsc::Receiver<bool>),
        Failed,
    }

    impl Keeping {
        /// Hands changes to the writer. Called with the ledger locked (`_made` is it), so
        /// the journal has them in the order they were made; nothing is written here.
        fn record(&self, _made: &Ledger, entries: Vec<Entry>) -> Durable {
            match self {
                _ if entries.is_empty() => Durable::Nothing,
                Keeping::InMemory => Durable::Nothing,
                Keeping::Unwritable => Durable::Failed,
                Keeping::OnDisk { mailbox, .. } => {
                    let (done, on_disk) = mpsc::channel();
                    match mailbox.send(ToWriter::Changes(entries, done)) {
                        Ok(()) => Durable::Waiting(on_disk),
                        Err(_) => Durable::Failed,
                    }
                }
            }
        }

        /// Waits, without the ledger's lock, until recorded changes are on disk.
        fn settled(&self, durable: Durable) -> Result<(), TokenRefused> {
            let written = match durable {
                Durable::Nothing => return Ok(()),
                Durable::Waiting(on_disk) => on_disk.recv().ok(),
                Durable::Failed => None,
            };
            match written {
                Some(true) => Ok(()),
                Some(false) => Err(TokenRefused::Storage),
                None => {
                    self.writer_gone();
                    Err(TokenRefused::Storage)
                }
            }
        }

        /// The writer thread ended (it only does by a panic): said once, in the log.
        fn writer_gone(&self) {
            if let Keeping::OnDisk { thread, .. } = self {
                if let Some(handle) = lock(thread).take() {
                    let how = if handle.join().is_err() { "panicked" } else { "ended" };
                    log::error!("the OAuth journal writer {how}: changes to grants are refused until a restart");
                }
            }
        }

        /// The state file written whole, with the sign-ins and codes in progress, and
        /// the journal emptied.
        fn save_at_stop(&self, sign_ins: Vec<(String, Pending)>, codes: Vec<(String, CodeRecord)>) {
            let Keeping::OnDisk { mailbox, .. } = self else { return };
            let in_progress = sign_ins.len();
            let (done, saved) = mpsc::channel();
            let sent = mailbox.send(ToWriter::Stop { sign_ins, codes, done }).is_ok();
            match sent.then(|| saved.recv().ok()).flatten() {
                Some(true) => log::info!("OAuth state saved ({in_progress} sign-in(s) in progress)"),
                Some(false) => log::error!("the OAuth state could not be saved at the stop"),
                None => self.writer_gone(),
            }
        }
    }

    /// Clients, sign-ins, codes and grants; every change to clients and grants reaches
    /// disk through `keeping` before it is answered.
    pub struct Store {
        ledger: Mutex<Ledger>,
        pub sign_ins: SignIns,
        keeping: Keeping,
        access_ttl: Duration,
        refresh_ttl: Duration,
        max_clients: usize,
    }

    pub fn token_hash(token: &str) -> String {
        hex::encode(Sha256::digest(token.as_bytes()))
    }

    /// 256 bits from the kernel.
    pub fn random_32() -> std::io::Result<[u8; 32]> {
        let mut bytes = [0u8; 32];
        std::fs::File::open("/dev/urandom")?.read_exact(&mut bytes)?;
        Ok(bytes)
    }

    /// A new token, code or id: the prefix and 256 random bits, base64url.
    pub fn new_secret(kind: &str) -> Result<String, TokenRefused> {
        let bytes = random_32().map_err(|e| {
            log::error!("no randomness from /dev/urandom: {e}");
            TokenRefused::Storage
        })?;
        Ok(format!("{TOKEN_PREFIX}{kind}_{}", base64url(&bytes)))
    }

    /// The key that wraps a grant's key for one token: HKDF-SHA256 of the token.
    fn token_key(token: &str, grant_id: &str) -> [u8; 32] {
        let hk = hkdf::Hkdf::<Sha256>::new(Some(b"outline-mcp-proxy grant key v1"), token.as_bytes());
        let mut key = [0u8; 32];
        // 32 bytes is well within HKDF-SHA256's output limit: this cannot fail
        let _ = hk.expand(grant_id.as_bytes(), &mut key);
        key
    }

    /// nonce ‖ ciphertext, hex; the associated data binds it to its grant and purpose.
    fn seal(key: &[u8; 32], aad: &str, plaintext: &[u8]) -> Result<String, TokenRefused> {
        let nonce_bytes = random_32().map_err(|_| TokenRefused::Storage)?;
        let nonce = XNonce::from_slice(&nonce_bytes[..24]);
        let cipher = XChaCha20Poly1305::new(key.into());
        let sealed = cipher
            .encrypt(nonce, Payload { msg: plaintext, aad: aad.as_bytes() })
            .map_err(|_| TokenRefused::Storage)?;
        let mut out = nonce.to_vec();
        out.extend_from_slice(&sealed);
        Ok(hex::encode(out))
    }

    fn open(key: &[u8; 32], aad: &str, sealed_hex: &str) -> Option<Vec<u8>> {
        let bytes = hex::decode(sealed_hex).ok()?;
        if bytes.len() < 24 + 16 {
            return None;
        }
        let (nonce, sealed) = bytes.split_at(24);
        let cipher = XChaCha20Poly1305::new(key.into());
        cipher.decrypt(XNonce::from_slice(nonce), Payload { msg: sealed, aad: aad.as_bytes() }).ok()
    }

    fn token_record(
        token: &str,
        grant_id: &str,
        grant_key: &[u8; 32],
        ttl: Duration,
    ) -> Result<TokenRecord, TokenRefused> {
        Ok(TokenRecord {
            hash: token_hash(token),
            wrapped_key: seal(&token_key(token, grant_id), &format!("wrap:{grant_id}"), grant_key)?,
            expires_at: now_unix() + ttl.as_secs(),
        })
    }

    /// sha256 of whose grant it is: the Outline team and user, never the name or email.
    fn user_key(signed_in: &SignedIn) -> String {
        token_hash(&format!("{}\n{}", signed_in.team_id, signed_in.user_id))
    }

    impl Store {
        /// The store, loaded from `dir` when one is given: the state file, then the
        /// journal's changes after it (a missing file is an empty store; an unreadable
        /// one is set aside and logged, never silently reused).
        pub fn open(dir: Option<PathBuf>, access_ttl: Duration, refresh_ttl: Duration, max_clients: usize) -> Store {
            let (ledger, in_progress, keeping) = match &dir {
                Some(dir) => restore(dir),
                None => (Ledger::default(), InProgress::default(), Keeping::InMemory),
            };
            let (ledger, sign_ins) = (Mutex::new(ledger), SignIns(Mutex::new(in_progress)));
            Store { ledger, sign_ins, keeping, access_ttl, refresh_ttl, max_clients }
        }

        pub fn grant_count(&self) -> usize {
            lock(&self.ledger).grants.len()
        }

        pub fn client_count(&self) -> usize {
            lock(&self.ledger).clients.len()
        }

        pub fn client(&self, id: &str) -> Option<Client> {
            lock(&self.ledger).clients.get(id).cloned()
        }

        /// A registered client kept; at MCP_PROXY_OAUTH_MAX_CLIENTS the oldest unused
        /// ones make room, and with none unused it is refused (`Full`).
        pub fn add_client(&self, client: Client) -> Result<(), TokenRefused> {
            let mut entries = Vec::new();
            let durable = {
                let mut state = lock(&self.ledger);
                let dropped = state.make_room_for_client(self.max_clients)?;
                if !dropped.is_empty() {
                    log::info!("{} unused OAuth client(s) forgotten to make room for a new one", dropped.len());
                }
                entries.extend(dropped.into_iter().map(|id| Entry::ClientGone { id }));
                entries.push(Entry::Client { client: client.clone() });
                state.clients.insert(client.id.clone(), client);
                self.keeping.record(&state, entries)
            };
            self.keeping.settled(durable)
        }

        /// Takes a code for good (a second use finds nothing, and revokes what the
        /// first use was given, as RFC 6749 §4.1.2 asks).
        pub fn take_code(&self, code: &str) -> Result<Code, TokenRefused> {
            if let Some(taken) = self.sign_ins.take_code(code) {
                return taken;
            }
            if let Some(grant_id) = self.sign_ins.replay_of_used_code(code) {
                log::warn!("an authorization code was used twice: its grant is revoked");
                self.revoke_grant(&grant_id)?;
            }
            Err(TokenRefused::InvalidGrant("The authorization code is unknown or was already used."))
        }

        /// A new grant for a redeemed code: its key, sealed credential, and two tokens.
        pub fn create_grant(&self, code_text: &str, code: &Code) -> Result<Issued, TokenRefused> {
            let grant_id = base64url(&random_32().map_err(|_| TokenRefused::Storage)?);
            let grant_key = random_32().map_err(|_| TokenRefused::Storage)?;
            let plaintext = serde_json::to_vec(&code.signed_in).map_err(|_| TokenRefused::Storage)?;
            let sealed = seal(&grant_key, &format!("grant:{grant_id}"), &plaintext)?;
            let access_token = new_secret("at")?;
            let refresh_token = new_secret("rt")?;
            let grant = GrantRecord {
                id: grant_id.clone(),
                client_id: code.client_id.clone(),
                resource: code.resource.clone(),
                sealed,
                refresh: token_record(&refresh_token, &grant_id, &grant_key, self.refresh_ttl)?,
                access: vec![token_record(&access_token, &grant_id, &grant_key, self.access_ttl)?],
                retired_refresh: Vec::new(),
                created_at: now_unix(),
                user: user_key(&code.signed_in),
            };
            let mut entries = vec![Entry::Grant { grant: grant.clone() }];
            let durable = {
                let mut state = lock(&self.ledger);
                entries.extend(state.add_grant_within_limits(grant));
                self.keeping.record(&state, entries)
            };
            let replayed = self.sign_ins.note_grant_of_code(code_text, &grant_id);
            self.keeping.settled(durable)?;
            if replayed {
                // the second use came before this grant existed: it ends now, unused
                log::warn!("an authorization code was used twice: its grant is revoked");
                self.revoke_grant(&grant_id)?;
                return Err(TokenRefused::InvalidGrant("The authorization code was used twice."));
            }
            Ok(Issued { access_token, refresh_token, expires_in: self.access_ttl.as_secs() })
        }

        /// Opens the grant an access token belongs to, if the token is alive.
        pub fn open_with_access(&self, token: &str) -> Result<Opened, TokenRefused> {
            self.open_with(token, false)
        }

        pub fn open_with_refresh(&self, token: &str) -> Result<Opened, TokenRefused> {
            self.open_with(token, true)
        }

        fn open_with(&self, token: &str, refresh: bool) -> Result<Opened, TokenRefused> {
            let hash = token_hash(token);
            let (record, grant_id, client_id, resource, boxed) = {
                let state = lock(&self.ledger);
                if refresh {
                    if let Some(grant_id) = state.retired.get(&hash).cloned() {
                        drop(state);
                        log::warn!("a refresh token was used twice: its grant is revoked");
                        self.revoke_grant(&grant_id)?;
                        return Err(TokenRefused::Replayed);
                    }
                }
                let refused = TokenRefused::InvalidGrant("The token is unknown, expired or revoked.");
                let grant = state.tokens.get(&hash).and_then(|id| state.grants.get(id)).ok_or(refused)?;
                let record = if refresh {
                    Some(&grant.refresh).filter(|r| r.hash == hash)
                } else {
                    grant.access.iter().find(|a| a.hash == hash)
                };
                let record = record.cloned().ok_or(TokenRefused::InvalidGrant("The token is of the wrong kind."))?;
                // only what opening needs, not the grant's other tokens (this is every
                // request's path at the OAuth resource)
                (record, grant.id.clone(), grant.client_id.clone(), grant.resource.clone(), grant.sealed.clone())
            };
            let (key, signed_in) = unwrap_grant(token, &grant_id, &record, &boxed)?;
            Ok(Opened { grant_id, client_id, resource, signed_in, key })
        }

        /// Seals a grant's credential again (Outline's tokens were refreshed).
        pub fn reseal(&self, opened: &Opened, signed_in: &SignedIn) -> Result<(), TokenRefused> {
            let plaintext = serde_json::to_vec(signed_in).map_err(|_| TokenRefused::Storage)?;
            let boxed = seal(&opened.key, &format!("grant:{}", opened.grant_id), &plaintext)?;
            let durable = {
                let mut state = lock(&self.ledger);
                let Some(grant) = state.grants.get_mut(&opened.grant_id) else {
                    return Err(TokenRefused::InvalidGrant("The grant was revoked."));
                };
                grant.sealed = boxed;
                let entry = Entry::Grant { grant: grant.clone() };
                self.keeping.record(&state, vec![entry])
            };
            self.keeping.settled(durable)
        }

        /// New access and refresh tokens for an opened grant; the old refresh token is
        /// retired. One already rotated out (presented again, even by a refresh at the
        /// same moment) is a replay: the whole grant is revoked (RFC 9700 §4.14).
        pub fn rotate(&self, opened: &Opened, old_refresh: &str) -> Result<Issued, TokenRefused> {
            let access_token = new_secret("at")?;
            let refresh_token = new_secret("rt")?;
            let access = token_record(&access_token, &opened.grant_id, &opened.key, self.access_ttl)?;
            let refresh = token_record(&refresh_token, &opened.grant_id, &opened.key, self.refresh_ttl)?;
            let durable = {
                let mut state = lock(&self.ledger);
                let old_hash = token_hash(old_refresh);
                let Some(mut grant) = state.grants.remove(&opened.grant_id) else {
                    return Err(TokenRefused::InvalidGrant("The grant was revoked."));
                };
                if grant.refresh.hash != old_hash {
                    state.grants.insert(grant.id.clone(), grant);
                    drop(state);
                    log::warn!("a refresh token was used twice at once: its grant is revoked");
                    self.revoke_grant(&opened.grant_id)?;
                    return Err(TokenRefused::Replayed);
                }
                state.unindex_tokens(&grant);
                grant.retired_refresh.insert(0, old_hash);
                grant.retired_refresh.truncate(RETIRED_KEPT);
                grant.refresh = refresh;
                let now = now_unix();
                grant.access.retain(|a| a.expires_at > now);
                grant.access.insert(0, access);
                grant.access.truncate(ACCESS_KEPT);
                state.index_tokens(&grant);
                let entry = Entry::Grant { grant: grant.clone() };
                state.grants.insert(grant.id.clone(), grant);
                self.keeping.record(&state, vec![entry])
            };
            self.keeping.settled(durable)?;
            Ok(Issued { access_token, refresh_token, expires_in: self.access_ttl.as_secs() })
        }

        /// Which grant a token (access or refresh, current or retired) belongs to.
        pub fn grant_of(&self, token: &str) -> Option<String> {
            let hash = token_hash(token);
            let state = lock(&self.ledger);
            state.tokens.get(&hash).or_else(|| state.retired.get(&hash)).cloned()
        }

        pub fn client_of(&self, grant_id: &str) -> Option<String> {
            lock(&self.ledger).grants.get(grant_id).map(|g| g.client_id.clone())
        }

        pub fn revoke_grant(&self, grant_id: &str) -> Result<(), TokenRefused> {
            let durable = {
                let mut state = lock(&self.ledger);
                match state.remove_grant(grant_id) {
                    Some(_) => self.keeping.record(&state, vec![Entry::GrantGone { id: grant_id.to_string() }]),
                    None => Durable::Nothing,
                }
            };
            self.keeping.settled(durable)
        }

        /// Forgets what has expired: sign-ins, codes, access tokens, grants whose
        /// refresh token is dead, and registered clients unused for a day. Expired
        /// access tokens are forgotten in memory only: on disk they open nothing.
        pub fn prune(&self) {
            let now = now_unix();
            self.sign_ins.prune(now);
            let durable = {
                let mut state = lock(&self.ledger);
                let entries = state.expire(now);
                self.keeping.record(&state, entries)
            };
            let _ = self.keeping.settled(durable);
        }

        /// At a stop: the state file written whole, with the sign-ins and codes in
        /// progress (they are otherwise not written, so a flood of authorize requests
        /// costs no disk writes), and the journal emptied.
        pub fn save_at_stop(&self) {
            if let Keeping::OnDisk { .. } = self.keeping {
                let (sign_ins, codes) = self.sign_ins.in_progress();
                self.keeping.save_at_stop(sign_ins, codes);
            }
        }
    }

    /// What `dir` keeps, loaded, and the journal's writer started over it (a journal
    /// that cannot be opened leaves the store `Unwritable`: sign-ins are refused).
    fn restore(dir: &std::path::Path) -> (Ledger, InProgress, Keeping) {
        let loaded = load(dir);
        let now = now_unix();
        let sign_ins: Vec<(String, Pending)> =
            loaded.sign_ins.into_iter().filter(|(_, p)| p.expires_at > now).collect();
        let codes: Vec<(String, CodeRecord)> = loaded.codes.into_iter().filter(|(_, c)| c.expires_at > now).collect();
        let keeping = match start_writer(dir, &loaded.clients, &loaded.grants, loaded.journal_bytes, &sign_ins, &codes)
        {
            Ok(writer) => writer,
            Err(e) => {
                log::error!("cannot open the OAuth journal in {}: {e}; sign-ins are refused", dir.display());
                Keeping::Unwritable
            }
        };
        let mut ledger = Ledger { clients: loaded.clients, ..Ledger::default() };
        let mut grants: Vec<GrantRecord> = loaded.grants.into_values().collect();
        grants.sort_by(|a, b| (a.created_at, &a.id).cmp(&(b.created_at, &b.id)));
        for grant in grants {
            ledger.add_grant(grant);
        }
        let in_progress = InProgress {
            pending: sign_ins.into_iter().collect(),
            codes: codes.into_iter().collect(),
            used_codes: HashMap::new(),
        };
        (ledger, in_progress, keeping)
    }

    /// A grant's key unwrapped with one of its live tokens, and its box opened with it.
    fn unwrap_grant(
        token: &str,
        grant_id: &str,
        record: &TokenRecord,
        boxed: &str,
    ) -> Result<([u8; 32], SignedIn), TokenRefused> {
        if record.expires_at <= now_unix() {
            return Err(TokenRefused::InvalidGrant("The token has expired."));
        }
        let grant_key = open(&token_key(token, grant_id), &format!("wrap:{grant_id}"), &record.wrapped_key)
            .and_then(|k| <[u8; 32]>::try_from(k.as_slice()).ok())
            .ok_or(TokenRefused::InvalidGrant("The token does not open its grant."))?;
        let plaintext = open(&grant_key, &format!("grant:{grant_id}"), boxed)
            .ok_or(TokenRefused::InvalidGrant("The grant could not be opened."))?;
        let signed_in: SignedIn = serde_json::from_slice(&plaintext).map_err(|_| TokenRefused::Storage)?;
        Ok((grant_key, signed_in))
    }

    /// The writer thread's own picture of what is on disk: each client and grant as
    /// its JSON (the state file with the journal applied), and the journal's size.
    struct Disk {
        dir: PathBuf,
        journal: std::fs::File,
        journal_bytes: u64,
        clients: HashMap<String, String>,
        grants: HashMap<String, String>,
        live_bytes: u64,
        state_file_written: bool,
        /// A write failed: the journal may end in half a line, so the next starts a new one.
        torn: bool,
    }

    impl Disk {
        /// Applies one change to the picture, and adds its line to `lines`.
        fn apply(&mut self, entry: &Entry, lines: &mut String) -> serde_json::Result<()> {
            let (map, id, json) = match entry {
                Entry::Client { client } => (&mut self.clients, &client.id, Some(serde_json::to_string(client)?)),
                Entry::ClientGone { id } => (&mut self.clients, id, None),
                Entry::Grant { grant } => (&mut self.grants, &grant.id, Some(serde_json::to_string(grant)?)),
                Entry::GrantGone { id } => (&mut self.grants, id, None),
            };
            let before = match json {
                Some(json) => {
                    self.live_bytes += json.len() as u64;
                    map.insert(id.clone(), json)
                }
                None => map.remove(id),
            };
            self.live_bytes -= before.map_or(0, |old| old.len() as u64);
            lines.push_str(&serde_json::to_string(entry)?);
            lines.push('\n');
            Ok(())
        }

        fn append(&mut self, lines: &str) -> std::io::Result<()> {
            if lines.is_empty() {
                return Ok(());
            }
            if self.torn {
                self.journal.write_all(b"\n")?;
                self.journal_bytes += 1;
            }
            self.torn = true;
            self.journal.write_all(lines.as_bytes())?;
            self.journal.sync_data()?;
            self.torn = false;
            self.journal_bytes += lines.len() as u64;
            Ok(())
        }

        fn needs_compaction(&self) -> bool {
            !self.state_file_written || self.journal_bytes > COMPACT_FACTOR * self.live_bytes
        }

        /// The state file rewritten from the picture (a temporary file, mode 0600,
        /// synced, renamed over the old one), then the journal emptied. A crash between
        /// the two replays the old journal onto the new file: the same state.
        fn compact(&mut self, sign_ins: &[(String, Pending)], codes: &[(String, CodeRecord)]) -> std::io::Result<()> {
            let mut text = String::with_capacity(self.live_bytes as usize + 256);
            text.push_str("{\"version\":1,\"clients\":[");
            join_into(&mut text, self.clients.values());
            text.push_str("],\"grants\":[");
            join_into(&mut text, self.grants.values());
            text.push_str("],\"sign_ins\":");
            text.push_str(&serde_json::to_string(sign_ins).map_err(std::io::Error::other)?);
            text.push_str(",\"codes\":");
            text.push_str(&serde_json::to_string(codes).map_err(std::io::Error::other)?);
            text.push('}');
            write_state(&self.dir, text.as_bytes())?;
            self.state_file_written = true;
            self.journal.set_len(0)?;
            self.journal.sync_all()?;
            self.journal_bytes = 0;
            self.torn = false;
            Ok(())
        }

        /// One round: every message waiting is written with one sync, then the
        /// journal compacted if it has grown past COMPACT_FACTOR times the live state.
        fn write_round(&mut self, batch: Vec<ToWriter>) {
            let mut lines = String::new();
            let mut acks = Vec::new();
            let mut stop = None;
            let mut ok = true;
            for message in batch {
                match message {
                    ToWriter::Changes(entries, done) => {
                        for entry in &entries {
                            ok &= self.apply(entry, &mut lines).is_ok();
                        }
                        acks.push(done);
                    }
                    ToWriter::Stop { sign_ins, codes, done } => stop = Some((sign_ins, codes, done)),
                }
            }
            let appended = match self.append(&lines) {
                Ok(()) => true,
                Err(e) => {
                    log::error!("cannot write the OAuth journal in {}: {e}", self.dir.display());
                    // the picture has the changes: writing it whole is the way back
                    self.state_file_written = false;
                    false
                }
            };
            let (sign_ins, codes) = stop.as_ref().map_or((&[][..], &[][..]), |(s, c, _)| (&s[..], &c[..]));
            let mut compacted = false;
            if stop.is_some() || self.needs_compaction() {
                match self.compact(sign_ins, codes) {
                    Ok(()) => compacted = true,
                    Err(e) => log::error!("cannot write the OAuth state file in {}: {e}", self.dir.display()),
                }
            }
            // changes are on disk in the journal or in the state file
            let changes_kept = ok && (appended || compacted);
            for done in acks {
                let _ = done.send(changes_kept);
            }
            if let Some((_, _, done)) = stop {
                let _ = done.send(changes_kept && compacted);
            }
        }
    }

    fn join_into<'a>(text: &mut String, items: impl Iterator<Item = &'a String>) {
        for (i, item) in items.enumerate() {
            if i > 0 {
                text.push(',');
            }
            text.push_str(item);
        }
    }

    /// The writer thread, with its picture of what was loaded; a journal left from
    /// before is folded into the state file at once.
    fn start_writer(
        dir: &std::path::Path,
        clients: &HashMap<String, Client>,
        grants: &HashMap<String, GrantRecord>,
        journal_bytes: u64,
        sign_ins: &[(String, Pending)],
        codes: &[(String, CodeRecord)],
    ) -> std::io::Result<Keeping> {
        use std::os::unix::fs::OpenOptionsExt;
        let journal = std::fs::OpenOptions::new().append(true).create(true).mode(0o600).open(dir.join(JOURNAL_FILE))?;
        let as_json = |json: serde_json::Result<String>| json.map_err(std::io::Error::other);
        let mut disk = Disk {
            dir: dir.to_path_buf(),
            journal,
            journal_bytes,
            clients: HashMap::new(),
            grants: HashMap::new(),
            live_bytes: 0,
            state_file_written: dir.join(STATE_FILE).exists(),
            torn: false,
        };
        for client in clients.values() {
            let json = as_json(serde_json::to_string(client))?;
            disk.live_bytes += json.len() as u64;
            disk.clients.insert(client.id.clone(), json);
        }
        for grant in grants.values() {
            let json = as_json(serde_json::to_string(grant))?;
            disk.live_bytes += json.len() as u64;
            disk.grants.insert(grant.id.clone(), json);
        }
        if journal_bytes > 0 {
            disk.compact(sign_ins, codes)?;
        }
        let (mailbox, inbox) = mpsc::channel::<ToWriter>();
        let handle = thread::Builder::new().name("oauth-journal".into()).spawn(move || {
            // ends when the store is gone (every sender dropped)
            while let Ok(first) = inbox.recv() {
                let mut batch = vec![first];
                batch.extend(inbox.try_iter());
                disk.write_round(batch);
            }
        })?;
        Ok(Keeping::OnDisk { mailbox, thread: Mutex::new(Some(handle)) })
    }

    fn write_state(dir: &std::path::Path, body: &[u8]) -> std::io::Result<()> {
        use std::os::unix::fs::OpenOptionsExt;
        let tmp = dir.join(format!("{STATE_FILE}.tmp"));
        let mut file = std::fs::OpenOptions::new().write(true).create(true).truncate(true).mode(0o600).open(&tmp)?;
        file.write_all(body)?;
        file.sync_all()?;
        std::fs::rename(&tmp, dir.join(STATE_FILE))
    }

    /// What is at rest: the state file, then the journal's changes applied in order.
    struct Loaded {
        clients: HashMap<String, Client>,
        grants: HashMap<String, GrantRecord>,
        sign_ins: Vec<(String, Pending)>,
        codes: Vec<(String, CodeRecord)>,
        journal_bytes: u64,
    }

    fn load(dir: &std::path::Path) -> Loaded {
        let file = load_state(dir);
        let mut loaded = Loaded {
            clients: file.clients.into_iter().map(|c| (c.id.clone(), c)).collect(),
            grants: file.grants.into_iter().map(|g| (g.id.clone(), g)).collect(),
            sign_ins: file.sign_ins,
            codes: file.codes,
            journal_bytes: 0,
        };
        replay_journal(dir, &mut loaded);
        loaded
    }

    /// The journal's lines applied in order. A line that is not an entry (cut short by
    /// a crash, or a write that failed: neither was ever reported as kept) is left out.
    fn replay_journal(dir: &std::path::Path, loaded: &mut Loaded) {
        let path = dir.join(JOURNAL_FILE);
        let text = match std::fs::read(&path) {
            Ok(bytes) => bytes,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => return,
            Err(e) => {
                log::error!("cannot read {}: {e}; OAuth grants are those of the state file", path.display());
                return;
            }
        };
        loaded.journal_bytes = text.len() as u64;
        let complete = text.ends_with(b"\n");
        let lines: Vec<&[u8]> = text.split(|b| *b == b'\n').filter(|l| !l.is_empty()).collect();
        for (i, line) in lines.iter().enumerate() {
            match serde_json::from_slice::<Entry>(line) {
                Ok(Entry::Client { client }) => {
                    loaded.clients.insert(client.id.clone(), client);
                }
                Ok(Entry::ClientGone { id }) => {
                    loaded.clients.remove(&id);
                }
                Ok(Entry::Grant { grant }) => {
                    loaded.grants.insert(grant.id.clone(), grant);
                }
                Ok(Entry::GrantGone { id }) => {
                    loaded.grants.remove(&id);
                }
                Err(_) if i + 1 == lines.len() && !complete => {
                    log::warn!("the OAuth journal's last line was cut short (a crash while writing); it is left out");
                }
                Err(_) => log::error!("line {} of {} is not a journal entry; it is left out", i + 1, path.display()),
            }
        }
    }

    fn load_state(dir: &std::path::Path) -> StateFile {
        let path = dir.join(STATE_FILE);
        let text = match std::fs::read_to_string(&path) {
            Ok(text) => text,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => return StateFile::default(),
            Err(e) => {
                log::error!("cannot read {}: {e}; OAuth grants start empty", path.display());
                return StateFile::default();
            }
        };
        match serde_json::from_str::<StateFile>(&text) {
            Ok(state) if state.version == 1 => state,
            _ => {
                let aside = dir.join(format!("{STATE_FILE}.unreadable-{}", now_unix()));
                log::error!("{} is not a state file of this version; set aside as {}", path.display(), aside.display());
                let _ = std::fs::rename(&path, aside);
                StateFile::default()
            }
        }
    }

    #[cfg(test)]
    mod tests {
        use super::*;
        use crate::auth::User;
        use std::time::Duration;

        /// A store in a fresh directory of its own, read back with `reopen`.
        fn test_store(name: &str) -> (std::path::PathBuf, Store) {
            let dir = std::env::temp_dir().join(format!("omp-{name}-{}", std::process::id()));
            std::fs::create_dir_all(&dir).unwrap();
            let store = reopen(&dir);
            (dir, store)
        }

        fn reopen(dir: &std::path::Path) -> Store {
            Store::open(Some(dir.to_path_buf()), Duration::from_secs(3600), Duration::from_secs(30 * 86400), 1000)
        }

        fn test_code(key: &str) -> Code {
            let user = User { id: "u1".into(), team_id: "t1".into(), name: "Carol".into(), email: "c@x".into() };
            Code {
                client_id: "client".into(),
                redirect_uri: "http://127.0.0.1/cb".into(),
                code_challenge: "c".into(),
                resource: "https://h/oauth/mcp".into(),
                signed_in: SignedIn::new(OutlineCredential::ApiKey { key: key.into() }, &user),
            }
        }

        /// A sign-in in progress for `client`, ten minutes to go.
        fn test_pending() -> Pending {
            Pending {
                client_id: "client".into(),
                client_name: "Desk".into(),
                redirect_uri: "http://127.0.0.1/cb".into(),
                state: Some("s".into()),
                code_challenge: "c".into(),
                resource: "https://h/oauth/mcp".into(),
                csrf_hash: "h".into(),
                attempts: 0,
                expires_at: crate::util::now_unix() + 600,
            }
        }

        #[test]
        fn a_grant_is_sealed_at_rest_and_opens_only_with_its_tokens() {
            let (dir, store) = test_store("grants");
            let issued = store.create_grant("omp_ac_x", &test_code("ol_api_secret_key")).unwrap();
            let on_disk = std::fs::read_to_string(dir.join("oauth-grants.json")).unwrap();
            for secret in ["ol_api_secret_key", "Carol", &issued.access_token, &issued.refresh_token] {
                assert!(!on_disk.contains(secret), "{secret} is on disk in the clear");
            }
            // a new process (the store read back) opens it with the token, and only so
            let again = reopen(&dir);
            let opened = again.open_with_access(&issued.access_token).unwrap();
            assert_eq!(opened.signed_in.credential.key(), "ol_api_secret_key");
            assert_eq!(opened.signed_in.name, "Carol");
            assert!(again.open_with_access(&issued.refresh_token).is_err(), "a refresh token is not an access token");
            assert!(again.open_with_access("omp_at_forged").is_err());
            // rotation: the new refresh token works, the old one presented again revokes it all
            let rotated = again.rotate(&again.open_with_refresh(&issued.refresh_token).unwrap(), &issued.refresh_token);
            let rotated = rotated.unwrap();
            assert!(again.open_with_refresh(&rotated.refresh_token).is_ok());
            assert_eq!(again.open_with_refresh(&issued.refresh_token).err(), Some(TokenRefused::Replayed));
            assert!(again.open_with_access(&rotated.access_token).is_err());
            assert_eq!(again.grant_count(), 0);
            std::fs::remove_dir_all(&dir).unwrap();
        }

        #[test]
        fn sign_ins_and_codes_in_progress_outlive_a_stop_sealed() {
            let (dir, store) = test_store("progress");
            let pending = test_pending();
            store.sign_ins.add_pending("omp_rq_one", pending.clone()).unwrap();
            let code = store.sign_ins.issue_code(&pending, test_code("ol_api_in_flight").signed_in).unwrap();
            store.save_at_stop();
            let on_disk = std::fs::read_to_string(dir.join("oauth-grants.json")).unwrap();
            for secret in ["ol_api_in_flight", "omp_rq_one", code.as_str(), "Carol"] {
                assert!(!on_disk.contains(secret), "{secret} is on disk in the clear");
            }
            let again = reopen(&dir);
            assert_eq!(again.sign_ins.pending("omp_rq_one").map(|p| p.client_name), Some("Desk".into()));
            assert!(again.take_code("omp_ac_forged").is_err());
            let taken = again.take_code(&code).unwrap();
            assert_eq!(taken.signed_in.credential.key(), "ol_api_in_flight");
            assert!(again.take_code(&code).is_err(), "a code is used once");
            std::fs::remove_dir_all(&dir).unwrap();
        }

        /// A code used twice: a second use after the grant revokes it; a second use
        /// while the first is still being made into a grant (its code taken, its grant
        /// not yet noted) makes that grant end as it is made: no tokens survive either way.
        #[test]
        fn a_code_used_twice_leaves_no_grant_whichever_use_comes_first() {
            let (dir, store) = test_store("code-twice");
            let pending = test_pending();
            let signed_in = || test_code("k").signed_in;
            // after: the grant was issued, then the replay revokes it
            let code = store.sign_ins.issue_code(&pending, signed_in()).unwrap();
            let issued = store.create_grant(&code, &store.take_code(&code).unwrap()).unwrap();
            assert!(store.take_code(&code).is_err());
            assert!(store.open_with_access(&issued.access_token).is_err(), "the replay revoked the grant");
            // during: the replay comes between the first use's take and its grant
            let code = store.sign_ins.issue_code(&pending, signed_in()).unwrap();
            let first = store.take_code(&code).unwrap();
            assert!(store.take_code(&code).is_err());
            assert!(matches!(store.create_grant(&code, &first), Err(TokenRefused::InvalidGrant(_))));
            assert!(lock(&store.ledger).grants.is_empty(), "a grant outlived the replay of its code");
            std::fs::remove_dir_all(&dir).unwrap();
        }

        #[test]
        fn grants_are_bounded_per_user_and_client_and_come_back_from_the_journal() {
            let (dir, store) = test_store("limits");
            let issued: Vec<_> =
                (0..12).map(|i| store.create_grant(&format!("omp_ac_{i}"), &test_code("k")).unwrap()).collect();
            assert_eq!(store.grant_count(), GRANTS_PER_CLIENT);
            assert!(store.open_with_access(&issued[1].access_token).is_err(), "the oldest went");
            assert!(store.open_with_access(&issued[2].access_token).is_ok());
            store.revoke_grant(&store.grant_of(&issued[5].access_token).unwrap()).unwrap();
            let journal = std::fs::read_to_string(dir.join("oauth-grants.journal")).unwrap();
            assert!(!journal.contains(&issued[11].access_token) && !journal.contains("Carol"));
            drop(store); // no stop: what comes back is the state file and the journal
            let again = reopen(&dir);
            assert_eq!(again.grant_count(), 9);
            assert!(again.open_with_access(&issued[5].access_token).is_err(), "a revoked grant stays revoked");
            assert!(again.open_with_access(&issued[11].access_token).is_ok());
            let mut code = test_code("k");
            for client in 0..11 {
                code.client_id = format!("client-{client}");
                for i in 0..10 {
                    again.create_grant(&format!("omp_ac_{client}_{i}"), &code).unwrap();
                }
            }
            assert_eq!(again.grant_count(), GRANTS_PER_USER);
            assert!(again.open_with_access(&issued[11].access_token).is_err(), "the user's oldest went first");
            std::fs::remove_dir_all(&dir).unwrap();
        }

        #[test]
        fn a_tampered_state_file_opens_nothing() {
            let (dir, store) = test_store("tamper");
            let issued = store.create_grant("omp_ac_y", &test_code("k")).unwrap();
            let path = dir.join("oauth-grants.json");
            let text = std::fs::read_to_string(&path).unwrap();
            let mut value: serde_json::Value = serde_json::from_str(&text).unwrap();
            let sealed = value["grants"][0]["sealed"].as_str().unwrap().to_string();
            let flipped = format!("{}{}", &sealed[..sealed.len() - 1], if sealed.ends_with('0') { '1' } else { '0' });
            value["grants"][0]["sealed"] = serde_json::Value::String(flipped);
            std::fs::write(&path, value.to_string()).unwrap();
            assert!(reopen(&dir).open_with_access(&issued.access_token).is_err());
            std::fs::remove_dir_all(&dir).unwrap();
        }
    }
}

mod auth {
    //! Owns the caller's credential (which headers carry it) and Outline's verdict on it:
    //! cached by the key's sha256, one call to Outline for concurrent misses. Calls
    //! `wire` (headers, the log line's context), `util`, and Outline over ureq.
    use crate::config::{Config, KeyMode};
    use crate::error::ProxyError;
    use crate::wire::{log_value, Incoming, LogContext};
    use crate::Proxy;

    /// Every token and code the proxy issues starts with this (minted by `grants`), so
    /// `/mcp` can refuse one without showing it to Outline.
    pub const TOKEN_PREFIX: &str = "omp_";
    use crate::util::{agent_base, lock, Flight};
    use serde_json::Value;
    use sha2::{Digest, Sha256};
    use std::collections::HashMap;
    use std::sync::atomic::{AtomicU64, Ordering};
    use std::sync::{Arc, Mutex};
    use std::time::{Duration, Instant};

    const MAX_KEY_LEN: usize = 512;
    /// The header that carries the key; `Authorization: Bearer` is the other way.
    pub const KEY_HEADER: &str = "x-outline-api-key";

    /// The key as the client sent it (in either header: which one is not kept, as
    /// nothing decides by it).
    pub struct Credential {
        pub key: String,
    }

    /// Whether the request carries a credential at all (it may still be a bad one).
    pub fn presents_credential(incoming: &Incoming) -> bool {
        incoming.header(KEY_HEADER).is_some() || incoming.header("authorization").is_some()
    }

    /// Whether a client header (its name in any case) can carry a credential. Neither is
    /// passed on as sent: only the key that was checked reaches a container (added again
    /// in `header` mode), never a second one the client put in the other header.
    pub fn is_credential_header(name: &str) -> bool {
        name.eq_ignore_ascii_case(KEY_HEADER) || name.eq_ignore_ascii_case("authorization")
    }

    /// The caller's key: X-Outline-API-Key, else `Authorization: Bearer`. Refuses
    /// (without asking Outline) one that is empty, too long or not printable ASCII.
    pub fn extract(incoming: &Incoming) -> Result<Credential, ProxyError> {
        let credential = match (incoming.header(KEY_HEADER), incoming.header("authorization")) {
            (Some(k), _) => Credential { key: k.trim().to_string() },
            (None, Some(auth)) => match bearer(auth) {
                Some(key) => Credential { key: key.to_string() },
                None => {
                    return Err(ProxyError::Unauthorized("Authorization must be 'Bearer <Outline API key>'.".into()))
                }
            },
            (None, None) => {
                return Err(ProxyError::Unauthorized(
                    "Send your Outline API key in the X-Outline-API-Key header (or Authorization: Bearer).".into(),
                ))
            }
        };
        if credential.key.starts_with(TOKEN_PREFIX) {
            // the proxy's own OAuth token: never shown to Outline
            return Err(ProxyError::Unauthorized(
                "This is a token of the proxy's OAuth sign-in: it is accepted only at the OAuth address.".into(),
            ));
        }
        if !is_plausible_key(&credential.key) {
            return Err(ProxyError::Unauthorized(format!(
                "The API key must be 1 to {MAX_KEY_LEN} printable ASCII characters without spaces."
            )));
        }
        Ok(credential)
    }

    /// What follows `Bearer ` (any case) in an Authorization header, trimmed.
    pub fn bearer(authorization: &str) -> Option<&str> {
        let auth = authorization.trim();
        let scheme = auth.get(..7)?;
        scheme.eq_ignore_ascii_case("bearer ").then(|| auth[7..].trim())
    }

    pub fn is_plausible_key(key: &str) -> bool {
        !key.is_empty() && key.len() <= MAX_KEY_LEN && key.bytes().all(|b| (0x21..=0x7e).contains(&b))
    }

    pub fn key_hash(key: &str) -> String {
        hex::encode(key_digest(key))
    }

    /// The key's sha256, as the verdict cache holds it.
    pub fn key_digest(key: &str) -> [u8; 32] {
        Sha256::digest(key.as_bytes()).into()
    }

    /// Whose container a request is for, as 128 bits of sha256 (32 hex digits): in
    /// `header` mode the Outline user (team and user id), so every key of a user reaches
    /// one container; in `env` mode the key itself, which that container holds.
    pub fn owner_id(mode: KeyMode, user: &User, key: &str) -> String {
        let hash = match mode {
            KeyMode::Header => key_hash(&format!("{}:{}", user.team_id, user.id)),
            KeyMode::Env => key_hash(key),
        };
        hash[..32].to_string()
    }

    pub fn container_name(prefix: &str, owner: &str) -> String {
        format!("{prefix}{owner}")
    }

    /// Who a key belongs to, as Outline says.
    #[derive(Clone, Debug, PartialEq)]
    pub struct User {
        pub id: String,
        pub team_id: String,
        pub name: String,
        pub email: String,
    }

    /// Outline's yes to a key, with what each request of it needs, made once per verdict
    /// (not per request): whose container it is, and the user's name for the log line.
    #[derive(Debug)]
    pub struct Verified {
        pub user: User,
        /// `container_name` of the prefix and `owner_id`.
        pub container: String,
        pub log_name: String,
    }

    pub type AuthResult = Result<Arc<Verified>, ProxyError>;

    enum AuthSlot {
        Known { verdict: AuthResult, until: Instant },
        Asking(Arc<Flight<AuthResult>>),
    }

    #[derive(Default)]
    pub struct AuthCounters {
        pub hits: AtomicU64,
        pub misses: AtomicU64,
        pub failures: AtomicU64,
        pub outline_calls: AtomicU64,
    }

    /// Outline's verdicts, cached by key hash, and the client that asks for them.
    pub struct Verifier {
        outline_url: String,
        key_mode: KeyMode,
        prefix: String,
        ttl: Duration,
        fail_ttl: Duration,
        cache: Mutex<HashMap<[u8; 32], AuthSlot>>,
        pub counters: AuthCounters,
        agent: ureq::Agent,
    }

    impl Verifier {
        pub fn new(cfg: &Config) -> Verifier {
            Verifier {
                outline_url: cfg.outline_url.clone(),
                key_mode: cfg.key_mode,
                prefix: cfg.prefix.clone(),
                ttl: cfg.auth_ttl,
                fail_ttl: cfg.auth_fail_ttl,
                cache: Mutex::new(HashMap::new()),
                counters: AuthCounters::default(),
                agent: outline_agent(),
            }
        }

        /// Outline's verdict on a key: from the cache while it is fresh, else one call
        /// to Outline shared by every request for that key that arrives meanwhile.
        pub fn verify(&self, key: &str) -> AuthResult {
            let hash = key_digest(key);
            let flight = {
                let mut cache = lock(&self.cache);
                match cache.get(&hash) {
                    Some(AuthSlot::Known { verdict, until }) if *until > Instant::now() => {
                        self.counters.hits.fetch_add(1, Ordering::Relaxed);
                        return self.count_failure(verdict.clone());
                    }
                    Some(AuthSlot::Asking(flight)) => {
                        let flight = flight.clone();
                        drop(cache);
                        self.counters.hits.fetch_add(1, Ordering::Relaxed);
                        return self.count_failure(flight.wait());
                    }
                    _ => {
                        let flight = Flight::new();
                        cache.insert(hash, AuthSlot::Asking(flight.clone()));
                        flight
                    }
                }
            };
            self.counters.misses.fetch_add(1, Ordering::Relaxed);
            let verdict = self.ask_outline(key).map(|user| {
                let container = container_name(&self.prefix, &owner_id(self.key_mode, &user, key));
                Arc::new(Verified { log_name: log_value(&user.name), container, user })
            });
            self.remember(hash, &verdict);
            flight.finish(verdict.clone());
            self.count_failure(verdict)
        }

        /// A yes for AUTH_TTL, a no for AUTH_FAIL_TTL; Outline down: ask again next time.
        fn remember(&self, hash: [u8; 32], verdict: &AuthResult) {
            let ttl = match verdict {
                Ok(_) => self.ttl,
                Err(ProxyError::Unauthorized(_)) => self.fail_ttl,
                Err(_) => Duration::ZERO,
            };
            let mut cache = lock(&self.cache);
            if ttl.is_zero() {
                cache.remove(&hash);
            } else {
                cache.insert(hash, AuthSlot::Known { verdict: verdict.clone(), until: Instant::now() + ttl });
            }
        }

        fn count_failure(&self, verdict: AuthResult) -> AuthResult {
            if verdict.is_err() {
                self.counters.failures.fetch_add(1, Ordering::Relaxed);
            }
            verdict
        }

        /// Drops the cached verdict on a key (Outline has just refused it).
        pub fn forget(&self, key: &str) {
            lock(&self.cache).remove(&key_digest(key));
        }

        /// Drops expired verdicts (the sleeper calls this).
        pub fn prune(&self) {
            lock(&self.cache).retain(|_, slot| match slot {
                AuthSlot::Known { until, .. } => *until > Instant::now(),
                AuthSlot::Asking(_) => true,
            });
        }

        /// `POST {OUTLINE_URL}/api/auth.info` with the key as a Bearer token.
        pub fn ask_outline(&self, key: &str) -> Result<User, ProxyError> {
            self.counters.outline_calls.fetch_add(1, Ordering::Relaxed);
            let url = format!("{}/api/auth.info", self.outline_url);
            let request = ureq::http::Request::post(&url)
                .header("Authorization", format!("Bearer {key}"))
                .header("Content-Type", "application/json")
                .header("Accept", "application/json")
                .body("{}".to_string())
                .map_err(|_| ProxyError::OutlineUnreachable("The Outline URL is not usable.".into()))?;
            let mut response = self.agent.run(request).map_err(|e| {
                log::warn!("Outline auth.info failed: {}", describe_ureq_error(&e));
                ProxyError::OutlineUnreachable("Outline could not be reached to check the API key.".into())
            })?;
            match response.status().as_u16() {
                200 => {
                    let body =
                        response.body_mut().with_config().limit(1 << 20).read_to_string().map_err(|_| {
                            ProxyError::OutlineUnreachable("Outline's answer could not be read.".into())
                        })?;
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

    /// `{"data":{"user":{"id","name","email"},"team":{"id"}}}` → the user.
    pub fn parse_auth_info(body: &str) -> Option<User> {
        let value: Value = serde_json::from_str(body).ok()?;
        let data = value.get("data")?;
        let user = data.get("user")?;
        let field = |k: &str| user.get(k).and_then(Value::as_str).unwrap_or("").to_string();
        let id = field("id");
        if id.is_empty() {
            return None;
        }
        let team_id = data.get("team").and_then(|t| t.get("id")).and_then(Value::as_str).unwrap_or("").to_string();
        Some(User { name: field("name"), email: field("email"), id, team_id })
    }

    /// A ureq error in words, never with a header (so never with a key).
    pub fn describe_ureq_error(e: &ureq::Error) -> String {
        match e {
            ureq::Error::Timeout(t) => format!("timed out ({t:?})"),
            ureq::Error::Io(io) => format!("{}", io.kind()),
            ureq::Error::ConnectionFailed => "connection failed".into(),
            ureq::Error::HostNotFound => "host not found".into(),
            other => format!("{other}"),
        }
    }

    /// To Outline: HTTPS checked against the host's CA store (a company CA works).
    pub fn outline_agent() -> ureq::Agent {
        agent_base()
            .https_only(false)
            .timeout_global(Some(Duration::from_secs(10)))
            .tls_config(ureq::tls::TlsConfig::builder().root_certs(ureq::tls::RootCerts::PlatformVerifier).build())
            .build()
            .new_agent()
    }

    /// Whose request this is: the credential, Outline's user for it, and the name of
    /// their container (also noted for the request's log line).
    pub fn identify(
        proxy: &Proxy,
        incoming: &Incoming,
        log_ctx: &mut LogContext,
    ) -> Result<(Credential, Arc<Verified>, String), ProxyError> {
        let credential = extract(incoming)?;
        let verified = proxy.auth.verify(&credential.key)?;
        let name = container_of(&verified, log_ctx);
        Ok((credential, verified, name))
    }

    /// The name of the user's container (made once per verdict, in `Verifier::verify`),
    /// noted with the user for the request's log line.
    pub fn container_of(verified: &Verified, log_ctx: &mut LogContext) -> String {
        log_ctx.user = Some(verified.log_name.clone());
        log_ctx.container = Some(verified.container.clone());
        verified.container.clone()
    }

    #[cfg(test)]
    mod tests {
        use super::*;
        use crate::config::KeyMode;
        use crate::error::ProxyError;
        use crate::tests::incoming;

        fn key_of(headers: &[(&str, &str)]) -> Result<String, ProxyError> {
            extract(&incoming(headers)).map(|c| c.key)
        }

        #[test]
        fn keys_come_from_either_header_and_bad_ones_are_refused() {
            assert_eq!(key_of(&[("X-Outline-API-Key", "ol_api_abc")]).unwrap(), "ol_api_abc");
            assert_eq!(key_of(&[("Authorization", "Bearer ol_api_xyz")]).unwrap(), "ol_api_xyz");
            // the dedicated header wins over Authorization
            assert_eq!(key_of(&[("Authorization", "Bearer other"), ("x-outline-api-key", "mine")]).unwrap(), "mine");
            for bad in ["", "has space", "caf\u{e9}", &"k".repeat(513)] {
                let err = key_of(&[("X-Outline-API-Key", bad)]).unwrap_err();
                assert_eq!(err.status(), 401, "{bad:?}");
            }
            assert_eq!(key_of(&[]).unwrap_err().status(), 401);
            assert_eq!(key_of(&[("Authorization", "Basic abc")]).unwrap_err().status(), 401);
            assert!(is_plausible_key(&"k".repeat(512)));
            let bearer = extract(&incoming(&[("Authorization", "Bearer k")])).unwrap();
            assert_eq!(bearer.key, "k");
        }

        #[test]
        fn names_come_from_the_user_in_header_mode_and_the_key_in_env_mode() {
            let h = key_hash("secret");
            assert_eq!(h, "2bb80d537b1da3e38bd30361aa855686bde0eacd7162fef6a25fe97bf527a25b");
            let ann = User { id: "u1".into(), team_id: "t1".into(), name: "Ann".into(), email: String::new() };
            // every key of a user: one owner; 128 bits of the hash
            let by_user = owner_id(KeyMode::Header, &ann, "key-1");
            assert_eq!(by_user, owner_id(KeyMode::Header, &ann, "key-2"));
            assert_eq!(by_user, key_hash("t1:u1")[..32]);
            let other_team = User { team_id: "t2".into(), ..ann.clone() };
            assert_ne!(by_user, owner_id(KeyMode::Header, &other_team, "key-1"));
            // env mode: the key is baked in, so one container per key
            assert_eq!(owner_id(KeyMode::Env, &ann, "secret"), "2bb80d537b1da3e38bd30361aa855686");
            assert_ne!(owner_id(KeyMode::Env, &ann, "key-1"), owner_id(KeyMode::Env, &ann, "key-2"));
            assert_eq!(container_name("mcp-", &by_user).len(), 4 + 32);
        }

        #[test]
        fn auth_info_answers_are_parsed() {
            let body = r#"{"ok":true,"data":{"user":{"id":"u1","name":"Ann","email":"a@x"},"team":{"id":"t1"}}}"#;
            let ann = User { id: "u1".into(), team_id: "t1".into(), name: "Ann".into(), email: "a@x".into() };
            assert_eq!(parse_auth_info(body), Some(ann));
            assert_eq!(parse_auth_info(r#"{"ok":true,"data":{}}"#), None);
            assert_eq!(parse_auth_info("not json"), None);
        }
    }
}

mod protocol {
    //! Owns the MCP message of a POST to the MCP path, read and parsed once (within
    //! MCP_PROXY_MAX_BODY): its method, id, name and protocol generation; what the proxy
    //! does with it (plan); the 2026-07-28 checks of headers against the body; the answers
    //! the proxy writes itself (server/discover, refusals); and the per-method call counts.
    //! Calls `wire`, `error`, `util`, and `sessions` for the session header's name.
    use crate::error::ProxyError;
    use crate::util::{base64_decode, lock};
    use crate::wire::Incoming;
    use serde_json::{json, Map, Value};
    use std::collections::HashMap;
    use std::io::{self, Read};
    use std::sync::Mutex;

    /// The path the container serves MCP at (the OAuth resource is sent there too).
    pub const MCP_PATH: &str = "/mcp";
    /// The stateless revision the proxy speaks at its front door.
    pub const MODERN_VERSIONS: &[&str] = &["2026-07-28"];
    /// The handshake-era revisions, passed to the container as they come.
    pub const HANDSHAKE_VERSIONS: &[&str] = &["2024-11-05", "2025-03-26", "2025-06-18", "2025-11-25"];
    pub const VERSION_META: &str = "io.modelcontextprotocol/protocolVersion";
    pub const SERVER_INFO_META: &str = "io.modelcontextprotocol/serverInfo";
    pub const SUBSCRIPTION_META: &str = "io.modelcontextprotocol/subscriptionId";
    /// JSON-RPC and MCP error codes the proxy answers with.
    pub const PARSE_ERROR: i64 = -32700;
    pub const INVALID_REQUEST: i64 = -32600;
    pub const HEADER_MISMATCH: i64 = -32020;
    pub const UNSUPPORTED_VERSION: i64 = -32022;

    #[derive(Clone, Copy, Debug, PartialEq, Eq)]
    pub enum Generation {
        /// 2024-11-05 … 2025-11-25: `initialize`, then sessions (echoed or not).
        Handshake,
        /// 2026-07-28: no handshake, no sessions; every request says its version.
        Stateless2026,
    }

    impl Generation {
        pub fn label(self) -> &'static str {
            match self {
                Generation::Handshake => "handshake",
                Generation::Stateless2026 => "2026-07-28",
            }
        }
    }

    /// A POST's one JSON-RPC message, parsed once; everything downstream reads this.
    pub struct McpPost {
        /// None for a client's JSON-RPC response (to a server's request).
        pub method: Option<String>,
        pub id: Option<Value>,
        /// `params.name` (tools/call, prompts/get) or `params.uri` (resources/read).
        pub name: Option<String>,
        pub generation: Generation,
        /// `params._meta` `io.modelcontextprotocol/protocolVersion`, when given.
        pub meta_version: Option<String>,
        pub raw: Value,
        /// The body as it came, sent on unchanged.
        pub bytes: Vec<u8>,
    }

    impl McpPost {
        pub fn is_notification(&self) -> bool {
            self.method.is_some() && self.id.is_none()
        }

        pub fn method(&self) -> &str {
            self.method.as_deref().unwrap_or("")
        }

        /// The client's `initialize` params, when this is its `initialize`.
        pub fn initialize_params(&self) -> Option<Value> {
            (self.method() == "initialize").then(|| self.raw.get("params").cloned()).flatten()
        }
    }

    /// A JSON-RPC error the proxy answers with itself.
    #[derive(Debug)]
    pub struct Refusal {
        pub status: u16,
        pub code: i64,
        pub message: String,
        pub id: Value,
        pub data: Option<Value>,
    }

    impl Refusal {
        /// 405 for a GET or DELETE in 2026-07-28.
        pub fn not_allowed() -> Refusal {
            Refusal::new(
                405,
                INVALID_REQUEST,
                "Method Not Allowed: 2026-07-28 has no GET stream and no sessions.",
                None,
            )
        }

        fn new(status: u16, code: i64, message: impl Into<String>, id: Option<&Value>) -> Refusal {
            Refusal { status, code, message: message.into(), id: id.cloned().unwrap_or(Value::Null), data: None }
        }

        pub fn body(&self) -> Value {
            let mut error = json!({"code": self.code, "message": self.message});
            if let Some(data) = &self.data {
                error["data"] = data.clone();
            }
            json!({"jsonrpc": "2.0", "id": self.id, "error": error})
        }
    }

    /// Why a POST could not be taken.
    pub enum NotTaken {
        /// The HTTP side failed (too large, too slow, unreadable).
        Http(ProxyError),
        /// Not one JSON-RPC message (-32700, -32600).
        Rpc(Refusal),
    }

    /// What the proxy does with an MCP POST.
    #[derive(Debug, PartialEq)]
    pub enum Plan {
        Refuse(Refusal),
        /// Answered 202 here, nothing forwarded.
        Accept,
        /// `server/discover`, answered from the container's `initialize` result.
        Discover,
        /// `subscriptions/listen`, a held SSE stream.
        Listen,
        /// Forwarded on the user's default upstream session (no id of the client's).
        OnDefault,
        /// Passed as it came: with the client's own session id, or its `initialize`.
        AsSent,
    }

    impl PartialEq for Refusal {
        fn eq(&self, other: &Refusal) -> bool {
            self.status == other.status && self.code == other.code
        }
    }

    /// A POST to the MCP path: the only requests whose body the proxy reads.
    pub fn is_mcp_post(incoming: &Incoming) -> bool {
        incoming.method == "POST" && incoming.path == MCP_PATH
    }

    /// A GET or DELETE that says it speaks a stateless revision: 405 (it has neither).
    pub fn is_stateless_get_or_delete(incoming: &Incoming) -> bool {
        matches!(incoming.method.as_str(), "GET" | "DELETE")
            && incoming.path == MCP_PATH
            && header_version(incoming).is_some_and(|v| MODERN_VERSIONS.contains(&v))
    }

    fn header_version(incoming: &Incoming) -> Option<&str> {
        incoming.header("mcp-protocol-version").map(str::trim)
    }

    /// Reads the body whole (at most `max_body`) and parses its one message.
    pub fn read_post(
        request: &mut tiny_http::Request,
        incoming: &Incoming,
        max_body: u64,
    ) -> Result<McpPost, NotTaken> {
        let bytes = read_body(request.as_reader(), max_body).map_err(NotTaken::Http)?;
        parse(incoming, bytes).map_err(NotTaken::Rpc)
    }

    fn read_body(reader: &mut dyn Read, max_body: u64) -> Result<Vec<u8>, ProxyError> {
        let mut bytes = Vec::new();
        match reader.take(max_body.saturating_add(1)).read_to_end(&mut bytes) {
            Ok(_) if bytes.len() as u64 > max_body => Err(ProxyError::TooLarge(max_body)),
            Ok(_) => Ok(bytes),
            Err(e) if matches!(e.kind(), io::ErrorKind::TimedOut | io::ErrorKind::WouldBlock) => {
                Err(ProxyError::RequestTimeout("The request body stopped arriving.".into()))
            }
            Err(_) => Err(ProxyError::BadRequest("The request body could not be read.".into())),
        }
    }

    /// The one parser of an MCP message.
    pub fn parse(incoming: &Incoming, bytes: Vec<u8>) -> Result<McpPost, Refusal> {
        let raw: Value = serde_json::from_slice(&bytes)
            .map_err(|_| Refusal::new(400, PARSE_ERROR, "Parse error: the body is not JSON.", None))?;
        let Some(message) = raw.as_object() else {
            let why = if raw.is_array() {
                "Invalid Request: JSON-RPC batches are not accepted; send one message per POST."
            } else {
                "Invalid Request: the body is not a JSON-RPC message."
            };
            return Err(Refusal::new(400, INVALID_REQUEST, why, None));
        };
        let id = message.get("id").filter(|id| !id.is_null()).cloned();
        let method = match message.get("method") {
            None => None,
            Some(Value::String(m)) => Some(m.clone()),
            Some(_) => {
                return Err(Refusal::new(400, INVALID_REQUEST, "Invalid Request: method is not a string.", id.as_ref()))
            }
        };
        if method.is_none() && !(message.contains_key("result") || message.contains_key("error")) {
            return Err(Refusal::new(400, INVALID_REQUEST, "Invalid Request: no method.", id.as_ref()));
        }
        let params = message.get("params");
        let name = match method.as_deref() {
            Some("tools/call" | "prompts/get") => params.and_then(|p| p.get("name")).and_then(Value::as_str),
            Some("resources/read") => params.and_then(|p| p.get("uri")).and_then(Value::as_str),
            _ => None,
        }
        .map(str::to_string);
        let meta_version = params
            .and_then(|p| p.get("_meta"))
            .and_then(|m| m.get(VERSION_META))
            .and_then(Value::as_str)
            .map(str::to_string);
        let says_modern = header_version(incoming).is_some_and(|v| MODERN_VERSIONS.contains(&v));
        // a version in `_meta` is the stateless revisions' mark, known or not
        let generation =
            if says_modern || meta_version.is_some() { Generation::Stateless2026 } else { Generation::Handshake };
        Ok(McpPost { method, id, name, generation, meta_version, raw, bytes })
    }

    /// What to do with a parsed POST. A handshake-era request without a session id that
    /// is not `initialize` goes on the user's default session.
    pub fn plan(incoming: &Incoming, post: &McpPost, has_session: bool) -> Plan {
        if post.generation == Generation::Stateless2026 {
            if let Err(refusal) = check_stateless(incoming, post) {
                return Plan::Refuse(refusal);
            }
            return match post.method() {
                "server/discover" => Plan::Discover,
                "subscriptions/listen" => Plan::Listen,
                _ if post.method.is_none() => Plan::Refuse(Refusal::new(
                    400,
                    INVALID_REQUEST,
                    "Invalid Request: a 2026-07-28 client sends no responses.",
                    post.id.as_ref(),
                )),
                _ if post.is_notification() => Plan::Accept,
                _ => Plan::OnDefault,
            };
        }
        if let Some(version) = header_version(incoming) {
            if !HANDSHAKE_VERSIONS.contains(&version) {
                return Plan::Refuse(unsupported(version, post.id.as_ref()));
            }
        }
        match (has_session, post.method()) {
            (true, _) | (false, "initialize") => Plan::AsSent,
            (false, "notifications/initialized") => Plan::Accept,
            (false, _) => Plan::OnDefault,
        }
    }

    fn unsupported(requested: &str, id: Option<&Value>) -> Refusal {
        let mut refusal = Refusal::new(400, UNSUPPORTED_VERSION, "Unsupported protocol version", id);
        refusal.data = Some(json!({"supported": supported_versions(), "requested": requested}));
        refusal
    }

    /// Every version the front door speaks, newest first.
    pub fn supported_versions() -> Vec<&'static str> {
        MODERN_VERSIONS.iter().chain(HANDSHAKE_VERSIONS.iter().rev()).copied().collect()
    }

    /// 2026-07-28's request metadata: the version is one the proxy speaks, and the
    /// headers say what the body says (`MCP-Protocol-Version`, `Mcp-Method`, `Mcp-Name`).
    fn check_stateless(incoming: &Incoming, post: &McpPost) -> Result<(), Refusal> {
        let id = post.id.as_ref();
        let mismatch = |what: String| Refusal::new(400, HEADER_MISMATCH, format!("Header mismatch: {what}"), id);
        let Some(header) = header_version(incoming) else {
            return Err(mismatch("the MCP-Protocol-Version header is missing".into()));
        };
        if let Some(meta) = &post.meta_version {
            if meta != header {
                return Err(mismatch("MCP-Protocol-Version does not match the body's protocol version".into()));
            }
        }
        if !MODERN_VERSIONS.contains(&header) {
            return Err(unsupported(header, id));
        }
        if let Some(method) = &post.method {
            match incoming.header("mcp-method").map(str::trim) {
                None => return Err(mismatch("the Mcp-Method header is missing".into())),
                Some(m) if m != method => return Err(mismatch("Mcp-Method does not match the body's method".into())),
                Some(_) => {}
            }
        }
        if matches!(post.method(), "tools/call" | "resources/read" | "prompts/get") {
            let header = incoming.header("mcp-name").map(str::trim);
            let Some(header) = header else { return Err(mismatch("the Mcp-Name header is missing".into())) };
            let Some(said) = header_text(header) else {
                return Err(mismatch("the Mcp-Name header is malformed".into()));
            };
            if Some(said.as_str()) != post.name.as_deref() {
                return Err(mismatch("Mcp-Name does not match the body's name".into()));
            }
        }
        Ok(())
    }

    /// A header value as text: plain, or the `=?base64?…?=` form decoded (UTF-8).
    pub fn header_text(value: &str) -> Option<String> {
        match value.strip_prefix("=?base64?").and_then(|rest| rest.strip_suffix("?=")) {
            Some(encoded) => String::from_utf8(base64_decode(encoded)?).ok(),
            None => Some(value.to_string()),
        }
    }

    /// The request as the container gets it: without the stateless revision's headers
    /// and any session id of the client's (the proxy sets the upstream session; without
    /// a version header the container takes the handshake default).
    pub fn as_handshake_request(incoming: &Incoming) -> Incoming {
        let mut request = incoming.with_target(&incoming.target);
        request.headers.retain(|(name, _)| {
            let lower = name.to_ascii_lowercase();
            !(lower == "mcp-protocol-version"
                || lower == "mcp-method"
                || lower == "mcp-name"
                || lower.starts_with("mcp-param-")
                || lower == crate::sessions::SESSION_HEADER
                || lower == "last-event-id")
        });
        request
    }

    /// `server/discover`'s answer, from the container's `initialize` result.
    pub fn discover_result(id: &Value, initialized: &Value) -> Value {
        let mut result = Map::new();
        result.insert("resultType".into(), json!("complete"));
        result.insert("supportedVersions".into(), json!(supported_versions()));
        result.insert("capabilities".into(), initialized.get("capabilities").cloned().unwrap_or_else(|| json!({})));
        if let Some(instructions) = initialized.get("instructions").filter(|i| i.is_string()) {
            result.insert("instructions".into(), instructions.clone());
        }
        let server_info = initialized.get("serverInfo").cloned().unwrap_or(Value::Null);
        result.insert("_meta".into(), json!({ SERVER_INFO_META: server_info }));
        insert_cache_hints(&mut result);
        json!({"jsonrpc": "2.0", "id": id, "result": result})
    }

    /// What a 2026-07-28 result gets that the container's does not carry.
    pub struct Stamp {
        /// The container's `serverInfo`, as `_meta` `io.modelcontextprotocol/serverInfo`.
        pub server_info: Value,
        /// A cacheable method's result must carry caching hints.
        pub cacheable: bool,
    }

    impl Stamp {
        pub fn new(server_info: Value, method: &str) -> Stamp {
            Stamp { server_info, cacheable: is_cacheable(method) }
        }
    }

    /// The methods whose complete results carry caching hints (`ttlMs`, `cacheScope`).
    pub fn is_cacheable(method: &str) -> bool {
        matches!(
            method,
            "server/discover"
                | "tools/list"
                | "prompts/list"
                | "resources/list"
                | "resources/templates/list"
                | "resources/read"
        )
    }

    /// Caching hints for what the container gives: immediately stale, and for this
    /// user only (each user has their own container and their own Outline data).
    fn insert_cache_hints(result: &mut Map<String, Value>) {
        result.entry("ttlMs").or_insert_with(|| json!(0));
        result.entry("cacheScope").or_insert_with(|| json!("private"));
    }

    /// A stateless revision's result carries the server's identity in its `_meta`
    /// (and caching hints where due): the message stamped, when it is a JSON-RPC result.
    pub fn stamp_result(text: &[u8], stamp: &Stamp) -> Option<String> {
        let mut message: Value = serde_json::from_slice(text).ok()?;
        let result = message.get_mut("result")?.as_object_mut()?;
        result.entry("resultType").or_insert_with(|| json!("complete"));
        if stamp.cacheable {
            insert_cache_hints(result);
        }
        let meta = result.entry("_meta").or_insert_with(|| json!({}));
        meta.as_object_mut()?.insert(SERVER_INFO_META.into(), stamp.server_info.clone());
        Some(message.to_string())
    }

    /// `subscriptions/listen`'s filter, kept to what the container can send.
    pub fn listen_filter(post: &McpPost, capabilities: &Value) -> Value {
        let asked = post.raw.pointer("/params/notifications").cloned().unwrap_or_else(|| json!({}));
        let can = |pointer: &str| capabilities.pointer(pointer).and_then(Value::as_bool).unwrap_or(false);
        let mut agreed = Map::new();
        for (field, pointer) in [
            ("toolsListChanged", "/tools/listChanged"),
            ("promptsListChanged", "/prompts/listChanged"),
            ("resourcesListChanged", "/resources/listChanged"),
        ] {
            if asked.get(field).and_then(Value::as_bool) == Some(true) && can(pointer) {
                agreed.insert(field.into(), json!(true));
            }
        }
        if let Some(uris) = asked.get("resourceSubscriptions").filter(|_| can("/resources/subscribe")) {
            agreed.insert("resourceSubscriptions".into(), uris.clone());
        }
        Value::Object(agreed)
    }

    /// Whether a notification from the container is one the listen filter asked for.
    pub fn wanted(filter: &Value, notification: &Value) -> bool {
        let on = |field: &str| filter.get(field).and_then(Value::as_bool) == Some(true);
        match notification.get("method").and_then(Value::as_str) {
            Some("notifications/tools/list_changed") => on("toolsListChanged"),
            Some("notifications/prompts/list_changed") => on("promptsListChanged"),
            Some("notifications/resources/list_changed") => on("resourcesListChanged"),
            Some("notifications/resources/updated") => {
                let uri = notification.pointer("/params/uri").and_then(Value::as_str);
                let uris = filter.get("resourceSubscriptions").and_then(Value::as_array);
                matches!((uri, uris), (Some(uri), Some(uris)) if uris.iter().any(|u| u.as_str() == Some(uri)))
            }
            _ => false,
        }
    }

    /// Distinct methods and tools counted; beyond it they count as "other" (the names
    /// come from clients).
    const MAX_COUNTED: usize = 200;

    /// Calls per method and per tool, for /metrics.
    #[derive(Default)]
    pub struct CallCounts {
        methods: Mutex<HashMap<String, u64>>,
        tools: Mutex<HashMap<String, u64>>,
    }

    impl CallCounts {
        pub fn count(&self, method: &str, tool: Option<&str>) {
            bump(&self.methods, method);
            if let Some(tool) = tool {
                bump(&self.tools, tool);
            }
        }

        pub fn methods(&self) -> Vec<(String, u64)> {
            sorted(&self.methods)
        }

        pub fn tools(&self) -> Vec<(String, u64)> {
            sorted(&self.tools)
        }
    }

    fn bump(counts: &Mutex<HashMap<String, u64>>, name: &str) {
        let mut counts = lock(counts);
        let key = if counts.contains_key(name) || counts.len() < MAX_COUNTED { name } else { "other" };
        *counts.entry(key.to_string()).or_insert(0) += 1;
    }

    fn sorted(counts: &Mutex<HashMap<String, u64>>) -> Vec<(String, u64)> {
        let mut all: Vec<(String, u64)> = lock(counts).iter().map(|(k, v)| (k.clone(), *v)).collect();
        all.sort();
        all
    }

    #[cfg(test)]
    mod tests {
        use super::*;
        use crate::wire::Incoming;
        use serde_json::json;

        fn post_to_mcp(headers: &[(&str, &str)]) -> Incoming {
            Incoming {
                method: "POST".into(),
                target: "/mcp".into(),
                path: "/mcp".into(),
                http10: false,
                headers: headers.iter().map(|(k, v)| (k.to_string(), v.to_string())).collect(),
                remote: None,
                wants_close: false,
            }
        }

        fn code_of(incoming: &Incoming, body: &str) -> i64 {
            match parse(incoming, body.as_bytes().to_vec()) {
                Ok(_) => 0,
                Err(refusal) => refusal.code,
            }
        }

        #[test]
        fn not_one_message_is_refused_with_the_json_rpc_codes() {
            let plain = post_to_mcp(&[]);
            assert_eq!(code_of(&plain, "{nope"), PARSE_ERROR);
            assert_eq!(code_of(&plain, r#"[{"jsonrpc":"2.0","id":1,"method":"ping"}]"#), INVALID_REQUEST);
            assert_eq!(code_of(&plain, "42"), INVALID_REQUEST);
            assert_eq!(code_of(&plain, r#"{"jsonrpc":"2.0","id":1,"method":7}"#), INVALID_REQUEST);
            assert_eq!(code_of(&plain, r#"{"jsonrpc":"2.0","id":1,"result":{}}"#), 0, "a client's response");
        }

        #[test]
        fn the_generation_comes_from_the_header_or_the_meta() {
            let body = r#"{"jsonrpc":"2.0","id":1,"method":"tools/call","params":{"name":"search_documents"}}"#;
            let old = parse(&post_to_mcp(&[]), body.as_bytes().to_vec()).unwrap();
            assert_eq!((old.generation, old.name.as_deref()), (Generation::Handshake, Some("search_documents")));
            let by_header = parse(&post_to_mcp(&[("MCP-Protocol-Version", "2026-07-28")]), body.into()).unwrap();
            assert_eq!(by_header.generation, Generation::Stateless2026);
            let meta = r#"{"jsonrpc":"2.0","id":1,"method":"tools/list","params":{"_meta":{"io.modelcontextprotocol/protocolVersion":"2026-07-28"}}}"#;
            let by_meta = parse(&post_to_mcp(&[]), meta.into()).unwrap();
            assert_eq!(by_meta.generation, Generation::Stateless2026);
            // …and then its missing headers are a mismatch
            let Plan::Refuse(refusal) = plan(&post_to_mcp(&[]), &by_meta, false) else { panic!("not refused") };
            assert_eq!(refusal.code, HEADER_MISMATCH);
        }

        #[test]
        fn handshake_requests_without_a_session_go_on_the_default_one() {
            let incoming = post_to_mcp(&[]);
            let plan_of =
                |body: &str, has_session| plan(&incoming, &parse(&incoming, body.into()).unwrap(), has_session);
            assert_eq!(plan_of(r#"{"jsonrpc":"2.0","id":1,"method":"initialize"}"#, false), Plan::AsSent);
            assert_eq!(plan_of(r#"{"jsonrpc":"2.0","method":"notifications/initialized"}"#, false), Plan::Accept);
            assert_eq!(plan_of(r#"{"jsonrpc":"2.0","id":2,"method":"tools/list"}"#, false), Plan::OnDefault);
            assert_eq!(plan_of(r#"{"jsonrpc":"2.0","id":2,"method":"tools/list"}"#, true), Plan::AsSent);
            let unknown = post_to_mcp(&[("MCP-Protocol-Version", "2031-01-01")]);
            let post = parse(&unknown, br#"{"jsonrpc":"2.0","id":2,"method":"tools/list"}"#.to_vec()).unwrap();
            let Plan::Refuse(refusal) = plan(&unknown, &post, true) else { panic!("not refused") };
            assert_eq!(refusal.code, UNSUPPORTED_VERSION);
            assert_eq!(refusal.body()["error"]["data"]["supported"][0], "2026-07-28");
        }

        #[test]
        fn mcp_name_is_compared_after_decoding_its_base64_form() {
            assert_eq!(header_text("=?base64?SGVsbG8sIOS4lueVjA==?=").as_deref(), Some("Hello, 世界"));
            assert_eq!(header_text("plain").as_deref(), Some("plain"));
            assert_eq!(header_text("=?base64?!!!?="), None);
        }

        #[test]
        fn results_are_stamped_with_the_server_and_cache_hints() {
            let stamp = Stamp::new(json!({"name": "mcp-outline"}), "tools/list");
            let stamped = stamp_result(br#"{"jsonrpc":"2.0","id":1,"result":{"tools":[]}}"#, &stamp).unwrap();
            let stamped: serde_json::Value = serde_json::from_str(&stamped).unwrap();
            assert_eq!(stamped["result"]["_meta"]["io.modelcontextprotocol/serverInfo"]["name"], "mcp-outline");
            assert_eq!(
                (stamped["result"]["ttlMs"].clone(), stamped["result"]["cacheScope"].clone()),
                (json!(0), json!("private"))
            );
            assert!(stamp_result(br#"{"jsonrpc":"2.0","id":1,"error":{"code":1}}"#, &stamp).is_none());
        }
    }
}

mod sessions {
    //! Owns the clients' MCP sessions: the ids it mints (MAC-bound to their owner), the upstream
    //! session each stands for, each user's default session, the bound. Calls `util`, `grants`.
    use crate::error::ProxyError;
    use crate::util::{lock, Flight};
    use hkdf::hmac::{Hmac, Mac};
    use serde_json::Value;
    use sha2::Sha256;
    use std::collections::HashMap;
    use std::path::Path;
    use std::sync::atomic::{AtomicU64, AtomicUsize};
    use std::sync::{Arc, Condvar, Mutex};
    use std::time::{Duration, Instant};

    /// The header that names a session, both ways.
    pub const SESSION_HEADER: &str = "mcp-session-id";
    /// The key session ids are minted under, in the state directory.
    pub const KEY_FILE: &str = "session-key";
    /// A minted id: 128 random bits, then 128 bits of HMAC-SHA256 over them and the
    /// owner, both hex.
    const ID_RANDOM: usize = 16;
    const ID_MAC: usize = 16;
    /// A container name ends in the 32 hex of its owner's hash (see `auth::container_name`).
    const OWNER_HASH: usize = 32;

    /// The secret session ids are minted and checked under.
    pub struct SessionKey([u8; 32]);

    impl SessionKey {
        pub fn from_bytes(bytes: [u8; 32]) -> SessionKey {
            SessionKey(bytes)
        }

        /// The key in `dir/session-key` (hex, mode 0600), made on first start; without a
        /// state directory a key for this run only (ids then die with the process).
        pub fn load_or_create(dir: Option<&Path>) -> Result<SessionKey, String> {
            let fresh = || crate::grants::random_32().map_err(|e| format!("no randomness from /dev/urandom: {e}"));
            let Some(dir) = dir else {
                log::warn!(
                    "no state directory: MCP session ids will not be known after a restart (clients re-initialize)"
                );
                return fresh().map(SessionKey);
            };
            let path = dir.join(KEY_FILE);
            match read_key(&path) {
                Ok(Some(key)) => return Ok(key),
                Ok(None) => {}
                Err(e) => return Err(format!("cannot read {}: {e}", path.display())),
            }
            let key = fresh()?;
            match write_key(&path, &key) {
                Ok(()) => {
                    log::info!("made a new session key in {}", path.display());
                    Ok(SessionKey(key))
                }
                // another process made it first: theirs is the key
                Err(e) if e.kind() == std::io::ErrorKind::AlreadyExists => match read_key(&path) {
                    Ok(Some(key)) => Ok(key),
                    _ => Err(format!("cannot read {}", path.display())),
                },
                Err(e) => Err(format!("cannot write {}: {e}", path.display())),
            }
        }

        /// The MAC binds the user: their owner hash, the container name without its
        /// prefix (so hosts with other prefixes but the same key know the id too).
        fn mac(&self, owner: &str, random: &[u8]) -> Hmac<Sha256> {
            let user = owner.len().checked_sub(OWNER_HASH).and_then(|at| owner.get(at..)).unwrap_or(owner);
            // a key of any length is accepted by HMAC; 32 bytes cannot fail
            let mut mac = <Hmac<Sha256> as Mac>::new_from_slice(&self.0).unwrap_or_else(|_| unreachable!());
            mac.update(b"outline-mcp-proxy session v1\0");
            mac.update(user.as_bytes());
            mac.update(b"\0");
            mac.update(random);
            mac
        }

        /// A new session id for `owner`.
        pub fn mint(&self, owner: &str) -> Result<String, ProxyError> {
            let random = crate::grants::random_32().map_err(|e| {
                log::error!("no randomness from /dev/urandom: {e}");
                ProxyError::ContainerUnreachable("The session could not be given an id.".into())
            })?;
            let random = &random[..ID_RANDOM];
            let tag = self.mac(owner, random).finalize().into_bytes();
            Ok(format!("{}{}", hex::encode(random), hex::encode(&tag[..ID_MAC])))
        }

        /// Whether the proxy minted `id` for `owner` (checked in constant time). Only the
        /// spelling it mints passes (lower-case hex, nothing around it): the table keys
        /// sessions by the id as written, so another spelling of the same bytes (upper
        /// case) would be a second session, one its client had ended among them.
        pub fn issued_to(&self, id: &str, owner: &str) -> bool {
            let minted_form = id.len() == 2 * (ID_RANDOM + ID_MAC)
                && id.bytes().all(|b| b.is_ascii_digit() || (b'a'..=b'f').contains(&b));
            if !minted_form {
                return false;
            }
            let Ok(bytes) = hex::decode(id) else { return false };
            if bytes.len() != ID_RANDOM + ID_MAC {
                return false;
            }
            let (random, tag) = bytes.split_at(ID_RANDOM);
            self.mac(owner, random).verify_truncated_left(tag).is_ok()
        }
    }

    /// The key file's key; None when there is no file yet.
    fn read_key(path: &Path) -> std::io::Result<Option<SessionKey>> {
        let text = match std::fs::read_to_string(path) {
            Ok(text) => text,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(None),
            Err(e) => return Err(e),
        };
        let bytes = hex::decode(text.trim()).ok().and_then(|b| <[u8; 32]>::try_from(b).ok());
        match bytes {
            Some(key) => Ok(Some(SessionKey(key))),
            None => Err(std::io::Error::new(std::io::ErrorKind::InvalidData, "not 64 hex digits")),
        }
    }

    /// Writes a new key file, readable by the proxy alone; never over an existing one.
    fn write_key(path: &Path, key: &[u8; 32]) -> std::io::Result<()> {
        use std::io::Write;
        use std::os::unix::fs::OpenOptionsExt;
        let mut file = std::fs::OpenOptions::new().write(true).create_new(true).mode(0o600).open(path)?;
        file.write_all(hex::encode(key).as_bytes())?;
        file.sync_all()
    }
    /// Sessions remembered per owner; the least recently used beyond it is forgotten.
    const MAX_PER_OWNER: usize = 64;

    /// A new upstream session being opened for a client session: waiters share it.
    pub type Opening = Arc<Flight<Result<String, crate::error::ProxyError>>>;

    struct ClientSession {
        /// The container name it was minted for.
        owner: String,
        /// None: the proxy knows no upstream session for it (a restart forgot it).
        upstream_id: Option<String>,
        /// The container incarnation that issued `upstream_id`, when known.
        incarnation: Option<String>,
        /// The client's own `initialize` params, replayed to open a new upstream session.
        init_params: Option<Value>,
        last_used: Instant,
        opening: Option<Opening>,
        /// The client ended it (DELETE): never opened again, so the container's own 404
        /// tells the client (kept, within the bound, only to remember that).
        ended: bool,
        /// The container's `initialize` result, for a session the proxy opened itself.
        initialized: Option<Value>,
    }

    impl ClientSession {
        /// A session of `owner`'s with no upstream session known yet.
        fn new(owner: &str) -> ClientSession {
            ClientSession {
                owner: owner.to_string(),
                upstream_id: None,
                incarnation: None,
                init_params: None,
                last_used: Instant::now(),
                opening: None,
                ended: false,
                initialized: None,
            }
        }

        /// Its upstream session was issued by another container incarnation than `now`.
        fn issued_by_other_incarnation(&self, now: Option<&str>) -> bool {
            matches!((&self.incarnation, now), (Some(had), Some(now)) if had != now)
        }
    }

    /// The table key of an owner's default session: a NUL cannot be in a header, so no
    /// client can present it.
    pub fn default_key(owner: &str) -> String {
        format!("\0default\0{owner}")
    }

    pub fn is_default(client_id: &str) -> bool {
        client_id.starts_with("\0default\0")
    }

    /// What to do with a request's session header.
    #[derive(Debug, PartialEq)]
    pub enum Route {
        /// No session: passed through untouched (stateless revisions, `initialize`).
        Plain,
        /// A session its client ended: sent as it came, never mapped or reopened, so the
        /// container answers it (404). (An id not minted for this owner never gets here:
        /// `check` turns it away first.)
        Foreign,
        /// The owner's session, sent upstream as `upstream_id`. `stale`: the proxy knows
        /// the container that issued it is gone, or knows no upstream session for it, so
        /// a new one must be opened first.
        Own { client_id: String, upstream_id: String, stale: bool },
    }

    /// How to open a new upstream session for a client session.
    pub enum Reopen {
        /// This request opens it (and must call `reopened` or `reopen_failed`).
        Lead(Opening, Option<Value>),
        /// Another request is opening it: wait for its result.
        Follow(Opening),
    }

    #[derive(Default)]
    pub struct Counters {
        pub resurrections: AtomicU64,
        pub held_streams: AtomicUsize,
    }

    pub struct Sessions {
        key: SessionKey,
        table: Mutex<HashMap<String, ClientSession>>,
        /// Each owner's latest client `initialize` params: its default session opens with them.
        latest_init: Mutex<HashMap<String, Value>>,
        /// Upstream sessions forgotten beyond the bound, to be closed (owner, upstream id).
        evicted: Mutex<Vec<(String, String)>>,
        /// Bumped when a container starts or a session is (re)mapped: held streams wake.
        changes: Mutex<u64>,
        changed: Condvar,
        pub counters: Counters,
    }

    impl Sessions {
        pub fn new(key: SessionKey) -> Sessions {
            Sessions {
                key,
                table: Mutex::new(HashMap::new()),
                latest_init: Mutex::new(HashMap::new()),
                evicted: Mutex::new(Vec::new()),
                changes: Mutex::new(0),
                changed: Condvar::new(),
                counters: Counters::default(),
            }
        }

        /// A request's session id must be one the proxy minted for this owner: any other
        /// (made up, another user's, from a key the proxy no longer has) is answered 404
        /// at once, so the client initializes again, before a container is woken.
        pub fn check(&self, client_id: Option<&str>, owner: &str) -> Result<(), ProxyError> {
            match client_id {
                Some(id) if !self.key.issued_to(id, owner) => Err(ProxyError::UnknownSession),
                _ => Ok(()),
            }
        }

        /// Decides how a request's session is sent. An id minted for this owner that the
        /// table does not hold (the proxy restarted, or another host minted it under the
        /// same key) is taken back, to be opened again upstream.
        pub fn route(&self, client_id: Option<&str>, owner: &str, incarnation: Option<&str>) -> Route {
            let Some(client_id) = client_id else { return Route::Plain };
            if !self.key.issued_to(client_id, owner) {
                return Route::Foreign;
            }
            let mut table = lock(&self.table);
            let session = table.entry(client_id.to_string()).or_insert_with(|| ClientSession::new(owner));
            if session.owner != owner || session.ended {
                return Route::Foreign;
            }
            session.last_used = Instant::now();
            let replaced = session.issued_by_other_incarnation(incarnation);
            let (upstream_id, stale) = match &session.upstream_id {
                Some(id) => (id.clone(), replaced),
                None => (client_id.to_string(), true),
            };
            let route = Route::Own { client_id: client_id.to_string(), upstream_id, stale };
            self.bound_owner(&mut table, owner);
            route
        }

        /// The owner's default session, for a request without a session id: `stale`
        /// (to be opened first) when never opened or issued by another incarnation.
        pub fn default_route(&self, owner: &str, incarnation: Option<&str>) -> Route {
            let client_id = default_key(owner);
            let mut table = lock(&self.table);
            let session = table.entry(client_id.clone()).or_insert_with(|| ClientSession::new(owner));
            session.last_used = Instant::now();
            let stale = session.upstream_id.is_none() || session.issued_by_other_incarnation(incarnation);
            Route::Own { client_id, upstream_id: session.upstream_id.clone().unwrap_or_default(), stale }
        }

        /// Forgets the least recently used of an owner's sessions beyond the bound (never
        /// its default one); their upstream sessions are kept to be closed.
        fn bound_owner(&self, table: &mut HashMap<String, ClientSession>, owner: &str) {
            let mut own: Vec<(Instant, String)> = table
                .iter()
                .filter(|(id, s)| s.owner == owner && !is_default(id))
                .map(|(id, s)| (s.last_used, id.clone()))
                .collect();
            if own.len() <= MAX_PER_OWNER {
                return;
            }
            own.sort();
            let mut evicted = lock(&self.evicted);
            for (_, id) in own.iter().take(own.len() - MAX_PER_OWNER) {
                if let Some(gone) = table.remove(id) {
                    if let (false, Some(upstream_id)) = (gone.ended, gone.upstream_id) {
                        evicted.push((owner.to_string(), upstream_id));
                    }
                }
            }
        }

        /// The owner's upstream sessions forgotten beyond the bound, to close now.
        pub fn take_evicted(&self, owner: &str) -> Vec<String> {
            let mut evicted = lock(&self.evicted);
            let (theirs, others): (Vec<_>, Vec<_>) = evicted.drain(..).partition(|(o, _)| o == owner);
            *evicted = others;
            theirs.into_iter().map(|(_, id)| id).collect()
        }

        /// The container's `initialize` result for a session the proxy opened.
        pub fn initialized(&self, client_id: &str) -> Option<Value> {
            lock(&self.table).get(client_id).and_then(|s| s.initialized.clone())
        }

        /// The container answered for this session: it knows it in this incarnation.
        pub fn confirm(&self, client_id: &str, incarnation: Option<&str>) {
            if let (Some(session), Some(now)) = (lock(&self.table).get_mut(client_id), incarnation) {
                if session.incarnation.as_deref() != Some(now) {
                    session.incarnation = Some(now.to_string());
                }
            }
        }

        /// A client's own `initialize` was answered with a new upstream session: the id
        /// the client is to see instead, minted for `owner`.
        pub fn opened(
            &self,
            owner: &str,
            upstream_id: &str,
            incarnation: Option<&str>,
            init_params: Option<Value>,
        ) -> Result<String, ProxyError> {
            let client_id = self.key.mint(owner)?;
            let mut table = lock(&self.table);
            let latest = init_params.clone();
            let session = ClientSession {
                upstream_id: Some(upstream_id.to_string()),
                incarnation: incarnation.map(str::to_string),
                init_params,
                ..ClientSession::new(owner)
            };
            table.insert(client_id.clone(), session);
            self.bound_owner(&mut table, owner);
            drop(table);
            if let Some(params) = latest {
                lock(&self.latest_init).insert(owner.to_string(), params);
            }
            self.notify_change();
            Ok(client_id)
        }

        /// Claims the reopening of a session, or joins the one under way.
        pub fn reopen(&self, client_id: &str) -> Option<Reopen> {
            let mut table = lock(&self.table);
            let session = table.get_mut(client_id)?;
            if let Some(opening) = &session.opening {
                return Some(Reopen::Follow(opening.clone()));
            }
            let opening = Flight::new();
            session.opening = Some(opening.clone());
            // a default session opens with its owner's latest `initialize`, if any
            let params = match is_default(client_id) {
                true => lock(&self.latest_init).get(&session.owner).cloned(),
                false => session.init_params.clone(),
            };
            Some(Reopen::Lead(opening, params))
        }

        /// A new upstream session stands for the client's from now on (`initialized`:
        /// the container's `initialize` result for it).
        pub fn reopened(
            &self,
            client_id: &str,
            opening: &Opening,
            upstream_id: &str,
            incarnation: Option<&str>,
            initialized: Value,
        ) {
            let mut first_open = false;
            if let Some(session) = lock(&self.table).get_mut(client_id) {
                // a default session opened the first time is no resurrection (a client's
                // session the proxy forgot in a restart is one)
                first_open = is_default(client_id) && session.upstream_id.is_none();
                session.upstream_id = Some(upstream_id.to_string());
                session.incarnation = incarnation.map(str::to_string);
                session.opening = None;
                session.initialized = Some(initialized);
            }
            if !first_open {
                self.counters.resurrections.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
            }
            opening.finish(Ok(upstream_id.to_string()));
            self.notify_change();
        }

        pub fn reopen_failed(&self, client_id: &str, opening: &Opening, error: crate::error::ProxyError) {
            if let Some(session) = lock(&self.table).get_mut(client_id) {
                session.opening = None;
            }
            opening.finish(Err(error));
        }

        /// The client ended its session (DELETE): the mapping goes with it.
        pub fn ended(&self, client_id: &str, owner: &str) {
            if let Some(session) = lock(&self.table).get_mut(client_id).filter(|s| s.owner == owner) {
                session.ended = true;
                session.init_params = None;
            }
        }

        /// The upstream id a held stream attaches with, when the session is the owner's
        /// and was not issued by another incarnation than `incarnation`.
        pub fn attachable(&self, client_id: &str, owner: &str, incarnation: Option<&str>) -> Option<String> {
            let table = lock(&self.table);
            let session = table.get(client_id).filter(|s| s.owner == owner && !s.ended)?;
            match session.issued_by_other_incarnation(incarnation) {
                true => None,
                false => session.upstream_id.clone(),
            }
        }

        /// Sessions per owner (container name), for /stats and /metrics.
        pub fn per_owner(&self) -> HashMap<String, usize> {
            let mut counts = HashMap::new();
            for session in lock(&self.table).values().filter(|s| !s.ended) {
                *counts.entry(session.owner.clone()).or_insert(0) += 1;
            }
            counts
        }

        pub fn notify_change(&self) {
            *lock(&self.changes) += 1;
            self.changed.notify_all();
        }

        pub fn generation(&self) -> u64 {
            *lock(&self.changes)
        }

        /// Waits until something changed since `seen`, or `limit` passed.
        pub fn wait_change(&self, seen: u64, limit: Duration) -> u64 {
            let guard = lock(&self.changes);
            let (guard, _) =
                self.changed.wait_timeout_while(guard, limit, |now| *now == seen).unwrap_or_else(|e| e.into_inner());
            *guard
        }
    }

    #[cfg(test)]
    mod tests {
        use super::*;

        fn test_sessions() -> Sessions {
            Sessions::new(SessionKey::from_bytes([7; 32]))
        }

        #[test]
        fn sessions_are_bound_to_their_owner_and_reopened_when_stale() {
            let s = test_sessions();
            assert_eq!(s.route(None, "mcp-a", None), Route::Plain);
            // a client's own initialize, answered by incarnation i1: the client gets a minted id
            let s1 = s
                .opened("mcp-a", "u1", Some("i1"), Some(serde_json::json!({"protocolVersion": "2025-06-18"})))
                .unwrap();
            assert_ne!(s1, "u1");
            let own = |upstream: &str, stale| Route::Own { client_id: s1.clone(), upstream_id: upstream.into(), stale };
            assert_eq!(s.route(Some(&s1), "mcp-a", Some("i1")), own("u1", false));
            // the same id with another user's key is never mapped, and is turned away
            assert_eq!(s.route(Some(&s1), "mcp-b", Some("i1")), Route::Foreign);
            assert!(s.check(Some(&s1), "mcp-b").is_err() && s.check(Some(&s1), "mcp-a").is_ok());
            // a container that is not the one that issued it: stale, and no stream attaches
            assert_eq!(s.route(Some(&s1), "mcp-a", Some("i2")), own("u1", true));
            assert_eq!(s.attachable(&s1, "mcp-a", Some("i2")), None);
            assert_eq!(s.attachable(&s1, "mcp-b", Some("i1")), None);
            // one request reopens, the others wait for it; the client's params are replayed
            let Some(Reopen::Lead(opening, params)) = s.reopen(&s1) else { panic!("expected to lead") };
            assert_eq!(params.unwrap()["protocolVersion"], "2025-06-18");
            assert!(matches!(s.reopen(&s1), Some(Reopen::Follow(_))));
            s.reopened(&s1, &opening, "u2", Some("i2"), serde_json::json!({}));
            assert_eq!(opening.wait().unwrap(), "u2");
            assert_eq!(s.route(Some(&s1), "mcp-a", Some("i2")), own("u2", false));
            assert_eq!(s.attachable(&s1, "mcp-a", Some("i2")).as_deref(), Some("u2"));
            assert_eq!(s.counters.resurrections.load(std::sync::atomic::Ordering::Relaxed), 1);
            // DELETE by another owner does nothing; by the owner, the mapping goes
            s.ended(&s1, "mcp-b");
            assert_eq!(s.per_owner().get("mcp-a"), Some(&1));
            s.ended(&s1, "mcp-a");
            assert_eq!(s.per_owner().get("mcp-a"), None);
            // and an ended session is never opened again: the container's 404 answers
            assert_eq!(s.route(Some(&s1), "mcp-a", Some("i2")), Route::Foreign);
            assert_eq!(s.attachable(&s1, "mcp-a", Some("i2")), None);
        }

        #[test]
        fn session_ids_are_known_by_their_mac_alone() {
            let s = test_sessions();
            let id = s.opened("mcp-a", "u1", Some("i1"), None).unwrap();
            // another process with the same key (a restart, another host) knows the id as
            // mcp-a's, has no upstream session for it, so opens one
            let again = test_sessions();
            assert!(again.check(Some(&id), "mcp-a").is_ok());
            assert_eq!(
                again.route(Some(&id), "mcp-a", Some("i1")),
                Route::Own { client_id: id.clone(), upstream_id: id.clone(), stale: true }
            );
            assert_eq!(again.attachable(&id, "mcp-a", Some("i1")), None);
            // made-up ids, altered ids, and ids under another key are not the proxy's
            let other = Sessions::new(SessionKey::from_bytes([8; 32]));
            let mut altered = id.clone().into_bytes();
            altered[0] = if altered[0] == b'0' { b'1' } else { b'0' };
            let upper = id.to_uppercase();
            for bad in
                ["", "made-up", &"0".repeat(64), std::str::from_utf8(&altered).unwrap(), &upper, &format!(" {id}")]
            {
                assert!(s.check(Some(bad), "mcp-a").is_err(), "{bad}");
            }
            assert!(other.check(Some(&id), "mcp-a").is_err());
            assert!(s.check(None, "mcp-a").is_ok());
            // the user is bound, not the host's container prefix
            let hash = "0123456789abcdef0123456789abcdef";
            let id = s.opened(&format!("h1-{hash}"), "u1", None, None).unwrap();
            assert!(again.check(Some(&id), &format!("mcp-{hash}")).is_ok());
            assert!(again.check(Some(&id), &format!("mcp-{}", hash.replace('0', "1"))).is_err());
        }

        #[test]
        fn the_session_key_is_made_once_and_kept() {
            use std::os::unix::fs::PermissionsExt;
            let dir = std::env::temp_dir().join(format!("session-key-test-{}", std::process::id()));
            std::fs::create_dir_all(&dir).unwrap();
            let _ = std::fs::remove_file(dir.join(KEY_FILE));
            let first = Sessions::new(SessionKey::load_or_create(Some(&dir)).unwrap());
            let mode = std::fs::metadata(dir.join(KEY_FILE)).unwrap().permissions().mode();
            assert_eq!(mode & 0o777, 0o600);
            let id = first.opened("mcp-a", "u1", None, None).unwrap();
            let second = Sessions::new(SessionKey::load_or_create(Some(&dir)).unwrap());
            assert!(second.check(Some(&id), "mcp-a").is_ok());
            std::fs::write(dir.join(KEY_FILE), "not a key").unwrap();
            assert!(SessionKey::load_or_create(Some(&dir)).is_err());
            std::fs::remove_dir_all(&dir).unwrap();
        }

        #[test]
        fn sessions_per_owner_are_bounded() {
            let s = test_sessions();
            for i in 0..100 {
                s.opened("mcp-a", &format!("s{i}"), None, None).unwrap();
            }
            s.opened("mcp-b", "other", None, None).unwrap();
            assert_eq!(s.per_owner()["mcp-a"], 64);
            assert_eq!(s.per_owner()["mcp-b"], 1);
        }
    }
}

mod staged {
    //! Owns the marks of mcp-outline's unsaved staged edits (which container holds which
    //! documents, since when; `staged-edits.json`) and `may_sleep`, asked before any stop.
    //! Reads JSON-RPC values its caller parsed. Calls `util`, `wire::log_value`.
    use crate::util::{lock, now_unix};
    use serde::{Deserialize, Serialize};
    use serde_json::Value;
    use std::collections::BTreeMap;
    use std::io::Write;
    use std::path::{Path, PathBuf};
    use std::sync::Mutex;
    use std::time::Duration;

    /// In the state directory, mode 0600: container names (owner hashes), document ids
    /// and times; nothing secret.
    const STATE_FILE: &str = "staged-edits.json";
    const TOOL: &str = "edit_document";
    /// mcp-outline's answers (1.10, `document_editing.py`): it reports failure as plain
    /// text, not `isError`. A staged edit ends in this sentence…
    const STAGED_TEXT: &str = "Document has unsaved changes";
    /// …a save in this one.
    const SAVED_TEXT: &str = "Saved to Outline.";

    /// A forwarded `tools/call` of `edit_document`, read from the client's request.
    #[derive(Clone, Debug, PartialEq)]
    pub struct EditCall {
        /// The JSON-RPC id, to find the answer to it.
        id: Value,
        pub document_id: String,
        pub save: bool,
    }

    /// The `edit_document` call in a JSON-RPC request, if it is one (`save` is true
    /// unless the call says false, as mcp-outline's default).
    pub fn edit_call(request: &Value) -> Option<EditCall> {
        if request.get("method")?.as_str()? != "tools/call" {
            return None;
        }
        let params = request.get("params")?;
        if params.get("name")?.as_str()? != TOOL {
            return None;
        }
        let arguments = params.get("arguments")?;
        let document_id = arguments.get("document_id")?.as_str()?.to_string();
        let save = arguments.get("save").and_then(Value::as_bool).unwrap_or(true);
        Some(EditCall { id: request.get("id")?.clone(), document_id, save })
    }

    /// What the container's answer to an edit means for the marks.
    #[derive(Clone, Copy, Debug, PartialEq, Eq)]
    pub enum Outcome {
        /// Staged and held in the container's memory only.
        Staged,
        /// Pushed to Outline: nothing of this document is held any more.
        Saved,
        /// Not the answer to this call, an error, or a refusal: the marks stay as they are.
        Unchanged,
    }

    /// Reads a JSON-RPC response to `call`.
    pub fn outcome(call: &EditCall, response: &Value) -> Outcome {
        if response.get("id") != Some(&call.id) {
            return Outcome::Unchanged;
        }
        let Some(result) = response.get("result") else { return Outcome::Unchanged };
        if result.get("isError").and_then(Value::as_bool) == Some(true) {
            return Outcome::Unchanged;
        }
        let texts: Vec<&str> = result
            .get("content")
            .and_then(Value::as_array)
            .map(|items| items.iter().filter_map(|c| c.get("text").and_then(Value::as_str)).collect())
            .unwrap_or_default();
        let says = |sentence: &str| texts.iter().any(|t| t.starts_with("Applied ") && t.contains(sentence));
        match call.save {
            false if says(STAGED_TEXT) => Outcome::Staged,
            true if says(SAVED_TEXT) => Outcome::Saved,
            _ => Outcome::Unchanged,
        }
    }

    /// The documents one container holds unsaved, each since when (unix seconds), and
    /// which process of the container holds them.
    #[derive(Clone, Debug, Default, Serialize, Deserialize)]
    pub struct Holding {
        pub documents: BTreeMap<String, u64>,
        #[serde(default)]
        pub incarnation: Option<String>,
    }

    impl Holding {
        /// Since when the container holds staged edits (its oldest mark).
        pub fn since(&self) -> u64 {
            self.documents.values().copied().min().unwrap_or_else(now_unix)
        }

        pub fn held_seconds(&self) -> u64 {
            now_unix().saturating_sub(self.since())
        }
    }

    #[derive(Default, Serialize, Deserialize)]
    struct StateFile {
        version: u32,
        containers: BTreeMap<String, Holding>,
    }

    /// Every container's marks, behind one lock; written through to the state file.
    pub struct Staged {
        marks: Mutex<BTreeMap<String, Holding>>,
        dir: Option<PathBuf>,
        timeout: Duration,
    }

    impl Staged {
        /// The marks kept in `dir` (none without one: they are then kept in memory only).
        pub fn open(dir: Option<PathBuf>, timeout: Duration) -> Staged {
            let marks = dir.as_deref().map(load).unwrap_or_default();
            if !marks.is_empty() {
                log::info!("{} container(s) hold staged edits (from {STATE_FILE})", marks.len());
            }
            Staged { marks: Mutex::new(marks), dir, timeout }
        }

        /// Records what the container `name` (in `incarnation`) answered to an edit.
        pub fn note_answer(&self, name: &str, incarnation: Option<&str>, call: &EditCall, response: &Value) {
            let outcome = outcome(call, response);
            let mut marks = lock(&self.marks);
            match outcome {
                Outcome::Unchanged => return,
                Outcome::Staged => {
                    let holding = marks.entry(name.to_string()).or_default();
                    if let Some(now) = incarnation.filter(|now| holding.incarnation.as_deref() != Some(now)) {
                        if holding.incarnation.is_some() {
                            // another process of the container: what it held before is gone
                            holding.documents.clear();
                        }
                        holding.incarnation = Some(now.to_string());
                    }
                    if holding.documents.contains_key(&call.document_id) {
                        return;
                    }
                    holding.documents.insert(call.document_id.clone(), now_unix());
                }
                Outcome::Saved => {
                    let Some(holding) = marks.get_mut(name) else { return };
                    if holding.documents.remove(&call.document_id).is_none() {
                        return;
                    }
                    if holding.documents.is_empty() {
                        marks.remove(name);
                    }
                }
            }
            self.save(&marks);
        }

        /// The one rule: a container may be put to sleep, removed or replaced when it
        /// holds no staged edits, or has held them longer than MCP_PROXY_STAGED_EDITS_TIMEOUT.
        pub fn may_sleep(&self, name: &str) -> bool {
            match lock(&self.marks).get(name) {
                None => true,
                Some(holding) => holding.held_seconds() >= self.timeout.as_secs(),
            }
        }

        /// The container `name` went to sleep, was removed, or died: what it held is
        /// gone. Warns, naming the user and the documents, when it held anything.
        pub fn lost(&self, name: &str, user: &str, why: &str) {
            let mut marks = lock(&self.marks);
            let Some(holding) = marks.remove(name) else { return };
            self.save(&marks);
            drop(marks);
            let documents: Vec<&str> = holding.documents.keys().map(String::as_str).collect();
            log::warn!(
                "staged edits lost: container={name} user={} documents={} held={}s ({why})",
                crate::wire::log_value(user),
                documents.join(","),
                holding.held_seconds()
            );
        }

        /// Keeps only the marks of containers running in the same process as when
        /// marked (at start-up and when Docker is back), from Docker's listing.
        pub fn keep_running(&self, listed: &[crate::docker::ContainerInfo]) {
            let gone: Vec<(String, String)> = lock(&self.marks)
                .iter()
                .filter_map(|(name, holding)| {
                    let info = listed.iter().find(|c| &c.name == name);
                    let same = info.is_some_and(|c| {
                        c.running && (holding.incarnation.is_none() || c.incarnation == holding.incarnation)
                    });
                    (!same).then(|| (name.clone(), info.map(|c| c.user.clone()).unwrap_or_default()))
                })
                .collect();
            for (name, user) in gone {
                self.lost(&name, &user, "the container stopped or restarted while the proxy was away");
            }
        }

        pub fn holding(&self, name: &str) -> Option<Holding> {
            lock(&self.marks).get(name).cloned()
        }

        fn save(&self, marks: &BTreeMap<String, Holding>) {
            let Some(dir) = &self.dir else { return };
            let snapshot = StateFile { version: 1, containers: marks.clone() };
            if let Err(e) = write_state(dir, &snapshot) {
                log::error!("cannot write {} in {}: {e}", STATE_FILE, dir.display());
            }
        }
    }

    fn write_state(dir: &Path, snapshot: &StateFile) -> std::io::Result<()> {
        use std::os::unix::fs::OpenOptionsExt;
        let body = serde_json::to_vec(snapshot).map_err(std::io::Error::other)?;
        let tmp = dir.join(format!("{STATE_FILE}.tmp"));
        let mut file = std::fs::OpenOptions::new().write(true).create(true).truncate(true).mode(0o600).open(&tmp)?;
        file.write_all(&body)?;
        file.sync_all()?;
        std::fs::rename(&tmp, dir.join(STATE_FILE))
    }

    fn load(dir: &Path) -> BTreeMap<String, Holding> {
        let path = dir.join(STATE_FILE);
        let text = match std::fs::read_to_string(&path) {
            Ok(text) => text,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => return BTreeMap::new(),
            Err(e) => {
                log::error!("cannot read {}: {e}; no staged edits are known", path.display());
                return BTreeMap::new();
            }
        };
        match serde_json::from_str::<StateFile>(&text) {
            Ok(state) if state.version == 1 => state.containers,
            _ => {
                log::error!("{} is not a staged-edits file of this version; no staged edits are known", path.display());
                BTreeMap::new()
            }
        }
    }

    #[cfg(test)]
    mod tests {
        use super::*;
        use crate::tests::edit_exchange;

        #[test]
        fn staged_edits_are_read_from_mcp_outlines_answers() {
            let staged = "Applied 1 edit(s) to 'Note'. Document has unsaved changes — call edit_document with save=True to push to Outline.";
            let (call, answer) = edit_exchange(7, false, staged);
            let edit = edit_call(&call).unwrap();
            assert_eq!((edit.document_id.as_str(), edit.save), ("doc-1", false));
            assert_eq!(outcome(&edit, &answer), Outcome::Staged);
            // another request's answer, and mcp-outline's failures (plain text), change nothing
            assert_eq!(outcome(&edit, &edit_exchange(8, false, staged).1), Outcome::Unchanged);
            for failure in
                ["Edit failed: 'x' not found in document. No edits were applied.", "Error editing document: 404"]
            {
                assert_eq!(outcome(&edit, &edit_exchange(7, false, failure).1), Outcome::Unchanged);
            }
            let (call, answer) = edit_exchange(9, true, "Applied 0 edit(s) to 'Note'. Saved to Outline.");
            assert_eq!(outcome(&edit_call(&call).unwrap(), &answer), Outcome::Saved);
            let nothing = "No edits provided and no staged changes to save. Nothing to do.";
            assert_eq!(outcome(&edit_call(&call).unwrap(), &edit_exchange(9, true, nothing).1), Outcome::Unchanged);
            // save defaults to true, as in mcp-outline; other tools are not edits
            let mut call = call;
            call["params"]["arguments"].as_object_mut().unwrap().remove("save");
            assert!(edit_call(&call).unwrap().save);
            call["params"]["name"] = "read_document".into();
            assert!(edit_call(&call).is_none());
        }
    }
}

mod registry {
    //! Owns what the proxy knows of each container (state and address, role, leases,
    //! counters) and every decision made on it: plans, sweep selection, the removal
    //! policy. Pure: no Docker, no HTTP; its one lock is held only for field updates.
    //! Calls `util`, `error`, `staged` (whether a container may sleep), and `docker` for
    //! its plain data types only (`ContainerInfo`, `Event`, `Role`), never a verb.
    use crate::docker::{ContainerInfo, Event, Role};
    use crate::error::ProxyError;
    use crate::staged::Staged;
    use crate::util::{lock, Flight};
    use std::collections::HashMap;
    use std::net::SocketAddr;
    use std::sync::{Arc, Mutex};
    use std::time::{Duration, Instant, SystemTime};

    /// Where a running container answers, and which process of it (see `ContainerInfo`).
    #[derive(Clone, PartialEq, Eq, Debug)]
    pub struct Place {
        pub address: SocketAddr,
        pub incarnation: Option<String>,
    }

    #[derive(Clone, PartialEq, Eq, Debug)]
    pub enum State {
        /// Not known to exist (a fresh entry, or removed).
        Missing,
        Stopped,
        /// Running, and answering at its place: a running entry always has one.
        Running(Place),
        /// Running by Docker's word, at this place, but not yet seen answering: a start
        /// the proxy did not make (Docker's restart policy, the daemon's own restart, a
        /// container found at start-up). Counted as running; nothing is routed to it
        /// until a request has waited for it to answer (`Containers::acquire`).
        Seen(Place),
        /// Believed to exist, state unknown (a start timed out, a connection failed).
        Unknown,
    }

    impl State {
        pub fn as_str(&self) -> &'static str {
            match self {
                State::Missing => "missing",
                State::Stopped => "stopped",
                // (one that is booting by Docker's hand is running all the same)
                State::Running(_) | State::Seen(_) => "running",
                State::Unknown => "unknown",
            }
        }

        pub fn is_running(&self) -> bool {
            matches!(self, State::Running(_) | State::Seen(_))
        }
    }

    pub type TransitionResult = Result<(), ProxyError>;
    pub type Transition = Arc<Flight<TransitionResult>>;

    pub struct Entry {
        pub state: State,
        /// Where it was last seen: set as it starts, kept after it stops (for /stats,
        /// and so that its address, given by Docker to another container, is spotted).
        pub last_address: Option<SocketAddr>,
        /// A user's container, or a spare: booted ahead of time, assigned to nobody yet.
        pub role: Role,
        /// The image it was made from, when known.
        pub image_id: Option<String>,
        pub user: String,
        pub created_at: Option<SystemTime>,
        pub last_used: SystemTime,
        pub idle_since: Instant,
        pub stopped_at: Option<SystemTime>,
        pub active: usize,
        pub websockets: usize,
        pub requests_total: u64,
        /// A start or stop under way; requests wait for it instead of racing it.
        pub transition: Option<Transition>,
    }

    impl Entry {
        pub fn new(state: State) -> Entry {
            Entry {
                last_address: match &state {
                    State::Running(place) | State::Seen(place) => Some(place.address),
                    _ => None,
                },
                state,
                role: Role::User,
                image_id: None,
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

        fn is_ready_spare(&self) -> bool {
            self.role == Role::Spare && self.state.is_running() && self.is_idle_and_settled()
        }

        fn begin(&mut self) -> Transition {
            let flight = Flight::new();
            self.transition = Some(flight.clone());
            flight
        }

        /// Running at `place`: the one way an entry comes to run.
        fn run_at(&mut self, place: Place) {
            self.last_address = Some(place.address);
            self.state = State::Running(place);
        }

        /// Docker says it runs at `place`, and the proxy has not seen it answer there:
        /// routed to only after a request waited for it (Docker reports a start when
        /// the process is launched, seconds before the server in it listens). One already
        /// answering at that very place and incarnation stays as it is.
        fn seen_at(&mut self, place: Place) {
            self.last_address = Some(place.address);
            if !matches!(&self.state, State::Running(known) if *known == place) {
                self.state = State::Seen(place);
            }
        }

        /// Gone or dead: where it was is worth nothing now.
        fn forget_place(&mut self, state: State) {
            self.state = state;
            self.last_address = None;
        }
    }

    /// What to do for a request, decided under the registry lock.
    pub enum Plan {
        Route(Lease),
        Wait(Transition),
        /// `known`: what the registry believed, so a wake or a create needs no inspect first.
        Start {
            flight: Transition,
            evict: Option<String>,
            known: State,
        },
        /// A ready spare, claimed for this user: renamed to the user's name, no restart.
        TakeSpare {
            flight: Transition,
            spare: String,
        },
    }

    /// A request's hold on a running container: while any lease is alive the sleeper
    /// leaves the container alone; dropping the last one starts its idle clock.
    pub struct Lease {
        registry: Arc<Registry>,
        pub name: String,
        pub address: SocketAddr,
        pub incarnation: Option<String>,
        websocket: bool,
    }

    impl Drop for Lease {
        fn drop(&mut self) {
            let mut entries = lock(&self.registry.entries);
            if let Some(entry) = entries.get_mut(&self.name) {
                entry.active = entry.active.saturating_sub(1);
                if self.websocket {
                    entry.websockets = entry.websockets.saturating_sub(1);
                }
                entry.last_used = SystemTime::now();
                entry.idle_since = Instant::now();
            }
        }
    }

    /// How a stop ended, for the registry.
    pub enum StopOutcome {
        Stopped,
        /// Removed rather than stopped (spares on, or an older image): a spare serves
        /// the user's next wake.
        Retired,
        /// Removed behind our back: nothing to stop, the next request creates it.
        Gone,
        Failed,
    }

    /// What one pass of the sleeper is to do; each name's transition is held.
    #[derive(Default)]
    pub struct Sweep {
        pub stop: Vec<(String, Transition)>,
        pub remove: Vec<(String, Transition)>,
    }

    /// A container's figures for /stats and /metrics.
    pub struct ContainerSnapshot {
        pub name: String,
        pub state: State,
        pub user: String,
        pub created_at: Option<SystemTime>,
        pub last_used: SystemTime,
        pub idle_seconds: u64,
        pub active: usize,
        pub websockets: usize,
        pub requests_total: u64,
        pub address: Option<SocketAddr>,
        /// Client sessions bound to it (filled in by `ops`).
        pub sessions: usize,
        pub role: Role,
        /// Documents it holds staged (unsaved), and for how long (filled in by `ops`).
        pub staged_documents: usize,
        pub staged_seconds: u64,
    }

    /// The removal policy, for the sleeper and `cleanup` alike: stopped at least
    /// REMOVE_AFTER ago (never when it is 0).
    pub fn due_for_removal(stopped_at: Option<SystemTime>, remove_after: Option<Duration>) -> bool {
        match (stopped_at, remove_after) {
            (Some(at), Some(after)) => at.elapsed().unwrap_or_default() >= after,
            _ => false,
        }
    }

    /// An address belongs to one container: when `name` is found at it, any other
    /// entry still holding it is stale (its container was replaced behind our back),
    /// and is inspected again before anything is routed to it.
    fn forget_address_elsewhere(entries: &mut HashMap<String, Entry>, name: &str, address: SocketAddr) {
        for (other, entry) in entries.iter_mut() {
            if other != name && entry.last_address == Some(address) {
                entry.last_address = None;
                // (a running entry, even one in a transition, is never left at it)
                if entry.transition.is_none() || entry.state.is_running() {
                    entry.state = State::Unknown;
                }
            }
        }
    }

    /// One entry per container name, behind one Mutex.
    pub struct Registry {
        pub entries: Mutex<HashMap<String, Entry>>,
        max_running: usize,
        /// The notification streams the proxy holds (locked after `entries`).
        streams: Arc<Streams>,
        /// Which containers hold staged edits (taken after `entries`, never before).
        pub staged: Arc<Staged>,
    }

    impl Registry {
        pub fn new(
            max_running: usize,
            user_max_inflight: usize,
            user_max_streams: usize,
            staged: Arc<Staged>,
        ) -> Registry {
            Registry {
                entries: Mutex::new(HashMap::new()),
                max_running,
                streams: Arc::new(Streams { held: Mutex::new(HashMap::new()), user_max_inflight, user_max_streams }),
                staged,
            }
        }

        /// Claims a slot for one more held notification stream of `name`'s user: at most
        /// MCP_PROXY_USER_MAX_STREAMS, and counted with their requests in flight.
        pub fn hold_stream(&self, name: &str) -> Result<StreamSlot, ProxyError> {
            let entries = lock(&self.entries);
            let active = entries.get(name).map_or(0, |e| e.active);
            self.streams.hold(active, name)
        }

        /// Routes to a running container, waits for a transition under way, or claims
        /// the start (making room under MAX_RUNNING, and under the memory budget's `fit`
        /// containers (usize::MAX: none), by naming an idle one to stop).
        pub fn plan(
            self: &Arc<Self>,
            name: &str,
            user_label: &str,
            websocket: bool,
            fit: usize,
        ) -> Result<Plan, ProxyError> {
            let mut entries = lock(&self.entries);
            // counted only under a cap: no walk over every container on each request
            let cap = self.cap(fit);
            let at_cap = cap < usize::MAX
                && entries.values().filter(|e| e.state.is_running() || e.transition.is_some()).count() >= cap;
            let entry = entries.entry(name.to_string()).or_insert_with(|| Entry::new(State::Missing));
            if entry.user != user_label {
                entry.user = user_label.to_string();
            }
            if let Some(flight) = &entry.transition {
                return Ok(Plan::Wait(flight.clone()));
            }
            if let State::Running(place) = &entry.state {
                self.streams.admit(entry.active, name)?;
                entry.active += 1;
                entry.requests_total += 1;
                if websocket {
                    entry.websockets += 1;
                }
                let (address, incarnation) = (place.address, place.incarnation.clone());
                let lease = Lease { registry: self.clone(), name: name.to_string(), address, incarnation, websocket };
                return Ok(Plan::Route(lease));
            }
            let known = entry.state.clone();
            let flight = entry.begin();
            // one Docker started is waited for where it runs: it holds its slot already
            if let State::Seen(_) = known {
                return Ok(Plan::Start { flight, evict: None, known });
            }
            // a ready spare serves at once, and takes no new slot under the cap (but never
            // in place of a container that may still run with staged edits)
            let spare = entries
                .iter()
                .find(|(n, e)| *n != name && e.is_ready_spare())
                .map(|(n, _)| n.clone())
                .filter(|_| self.staged.may_sleep(name));
            if let Some(spare) = spare {
                if let Some(s) = entries.get_mut(&spare) {
                    s.transition = Some(flight.clone());
                }
                return Ok(Plan::TakeSpare { flight, spare });
            }
            if !at_cap {
                return Ok(Plan::Start { flight, evict: None, known });
            }
            // a container holding staged edits is never the one to make room: 503 instead
            let victim = entries
                .iter()
                .filter(|(n, e)| *n != name && e.state.is_running() && e.is_idle_and_settled())
                .filter(|(n, _)| self.staged.may_sleep(n))
                .min_by_key(|(_, e)| e.idle_since)
                .map(|(n, _)| n.clone());
            match victim.as_ref().and_then(|v| entries.get_mut(v)) {
                Some(v) => {
                    v.transition = Some(flight.clone());
                    Ok(Plan::Start { flight, evict: victim, known })
                }
                None => {
                    if let Some(entry) = entries.get_mut(name) {
                        entry.transition = None;
                    }
                    let full = ProxyError::AtCapacity(cap);
                    flight.finish(Err(full.clone()));
                    Err(full)
                }
            }
        }

        /// Containers that may run at once: MAX_RUNNING (0 = no cap) and the budget's `fit`.
        fn cap(&self, fit: usize) -> usize {
            if self.max_running == 0 {
                fit
            } else {
                self.max_running.min(fit)
            }
        }

        pub fn note_image(&self, name: &str, image_id: &str) {
            if let Some(entry) = lock(&self.entries).get_mut(name) {
                entry.image_id = Some(image_id.to_string()).filter(|id| !id.is_empty());
            }
        }

        pub fn image_of(&self, name: &str) -> Option<String> {
            lock(&self.entries).get(name).and_then(|e| e.image_id.clone())
        }

        /// Ends a start: waiters get `result`; a failure leaves the state in doubt
        /// (unless Docker was simply away).
        pub fn finish_transition(&self, name: &str, flight: &Transition, result: TransitionResult) {
            {
                let mut entries = lock(&self.entries);
                if let Some(entry) = entries.get_mut(name) {
                    entry.transition = None;
                    if let Err(e) = &result {
                        if !matches!(e, ProxyError::DockerUnavailable(_)) {
                            entry.state = State::Unknown;
                        }
                    }
                }
            }
            flight.finish(result);
        }

        /// Where a starting container is, before it is ready.
        pub fn note_address(&self, name: &str, address: SocketAddr, created_at: Option<SystemTime>) {
            let mut entries = lock(&self.entries);
            forget_address_elsewhere(&mut entries, name, address);
            if let Some(entry) = entries.get_mut(name) {
                entry.last_address = Some(address);
                entry.created_at = created_at.or(entry.created_at);
            }
        }

        pub fn mark_running(&self, name: &str, address: SocketAddr, incarnation: Option<String>) {
            let mut entries = lock(&self.entries);
            forget_address_elsewhere(&mut entries, name, address);
            if let Some(entry) = entries.get_mut(name) {
                entry.run_at(Place { address, incarnation });
                entry.stopped_at = None;
            }
        }

        /// Where a running container answers, without a lease: for what must not keep
        /// it awake (a held notification stream).
        pub fn peek_running(&self, name: &str) -> Option<(SocketAddr, Option<String>)> {
            let entries = lock(&self.entries);
            match entries.get(name).filter(|e| e.transition.is_none()).map(|e| &e.state) {
                Some(State::Running(place)) => Some((place.address, place.incarnation.clone())),
                _ => None,
            }
        }

        /// A connection to the container failed: forget what we believed about it, so
        /// the next acquire inspects it again.
        pub fn mark_unknown(&self, name: &str) {
            if let Some(entry) = lock(&self.entries).get_mut(name) {
                if entry.transition.is_none() {
                    entry.state = State::Unknown;
                }
            }
        }

        pub fn state_of(&self, name: &str) -> State {
            lock(&self.entries).get(name).map(|e| e.state.clone()).unwrap_or(State::Missing)
        }

        /// (containers tracked, running)
        pub fn counts(&self) -> (usize, usize) {
            let entries = lock(&self.entries);
            (entries.len(), entries.values().filter(|e| e.state.is_running()).count())
        }

        pub fn snapshot(&self) -> Vec<ContainerSnapshot> {
            let mut containers: Vec<ContainerSnapshot> = lock(&self.entries)
                .iter()
                .map(|(name, e)| ContainerSnapshot {
                    name: name.clone(),
                    state: e.state.clone(),
                    user: e.user.clone(),
                    created_at: e.created_at,
                    last_used: e.last_used,
                    idle_seconds: if e.active > 0 { 0 } else { e.idle_since.elapsed().as_secs() },
                    active: e.active,
                    websockets: e.websockets,
                    requests_total: e.requests_total,
                    address: e.last_address,
                    sessions: 0,
                    role: e.role,
                    staged_documents: 0,
                    staged_seconds: 0,
                })
                .collect();
            containers.sort_by(|a, b| a.name.cmp(&b.name));
            containers
        }

        /// The spare keeper's view of the entries.
        pub fn spares(&self) -> Spares<'_> {
            Spares { registry: self }
        }

        /// What Docker reports (its listing, its events), applied to the entries.
        pub fn sightings(&self) -> Sightings<'_> {
            Sightings { registry: self }
        }

        /// The sleeper's view of the entries: what to stop and remove, and how it went.
        pub fn sweeps(&self) -> Sweeps<'_> {
            Sweeps { registry: self }
        }
    }

    /// The notification streams the proxy holds, per container name, and the per-user
    /// limits they count against: apart from the entries, whose life is the container's.
    /// Locked after `entries`, never before.
    pub struct Streams {
        held: Mutex<HashMap<String, usize>>,
        user_max_inflight: usize,
        user_max_streams: usize,
    }

    impl Streams {
        /// Refused when a user's requests in flight and held streams together have
        /// reached MCP_PROXY_USER_MAX_INFLIGHT (0 = no limit).
        fn admit(&self, active: usize, name: &str) -> Result<(), ProxyError> {
            let held = || lock(&self.held).get(name).copied().unwrap_or(0);
            match self.user_max_inflight > 0 && active + held() >= self.user_max_inflight {
                true => Err(ProxyError::UserBusy(self.user_max_inflight)),
                false => Ok(()),
            }
        }

        fn hold(self: &Arc<Self>, active: usize, name: &str) -> Result<StreamSlot, ProxyError> {
            self.admit(active, name)?;
            let mut held = lock(&self.held);
            let count = held.entry(name.to_string()).or_insert(0);
            if self.user_max_streams > 0 && *count >= self.user_max_streams {
                return Err(ProxyError::TooManyStreams(self.user_max_streams));
            }
            *count += 1;
            Ok(StreamSlot { streams: self.clone(), name: name.to_string() })
        }
    }

    /// One held notification stream of a user, counted while alive.
    pub struct StreamSlot {
        streams: Arc<Streams>,
        name: String,
    }

    impl Drop for StreamSlot {
        fn drop(&mut self) {
            let mut held = lock(&self.streams.held);
            if let Some(count) = held.get_mut(&self.name) {
                *count = count.saturating_sub(1);
                if *count == 0 {
                    held.remove(&self.name);
                }
            }
        }
    }

    /// The spares: containers booted ahead of time for whoever needs one next. They
    /// are entries like any other (the cap counts them), with `Role::Spare`.
    pub struct Spares<'a> {
        registry: &'a Registry,
    }

    impl Spares<'_> {
        /// A spare becomes `name`'s container: the entry takes its place (address and
        /// incarnation) and image, and the spare's entry goes (its transition ends with
        /// the user's).
        pub fn adopt(&self, spare: &str, name: &str) {
            let mut entries = lock(&self.registry.entries);
            let Some(taken) = entries.remove(spare) else { return };
            if let Some(entry) = entries.get_mut(name) {
                entry.state = taken.state;
                entry.last_address = taken.last_address;
                entry.image_id = taken.image_id;
                entry.created_at = taken.created_at;
                entry.stopped_at = None;
            }
        }

        /// A claimed spare that could not be taken goes back to the pool (or is
        /// forgotten when it is gone).
        pub fn release(&self, spare: &str, gone: bool) {
            let mut entries = lock(&self.registry.entries);
            if gone {
                entries.remove(spare);
            } else if let Some(entry) = entries.get_mut(spare) {
                entry.transition = None;
            }
        }

        /// A new spare, booting: counted at once, so only one boot at a time is started.
        pub fn begin(&self, name: &str) -> Transition {
            let mut entry = Entry::new(State::Missing);
            entry.role = Role::Spare;
            let flight = entry.begin();
            lock(&self.registry.entries).insert(name.to_string(), entry);
            flight
        }

        pub fn ready(&self, name: &str, address: SocketAddr, incarnation: Option<String>, image_id: &str) {
            self.registry.mark_running(name, address, incarnation);
            if let Some(entry) = lock(&self.registry.entries).get_mut(name) {
                entry.image_id = Some(image_id.to_string());
                entry.transition = None;
            }
        }

        /// Whether another spare may boot now: fewer than `wanted`, no user's container
        /// starting (user traffic first), and room under the cap and the budget's `fit`.
        pub fn wanted(&self, wanted: usize, fit: usize) -> bool {
            let mut entries = lock(&self.registry.entries);
            let is_spare = |e: &Entry| e.role == Role::Spare;
            // a spare removed or killed behind the proxy's back is forgotten
            entries.retain(|_, e| !(is_spare(e) && e.transition.is_none() && !e.state.is_running()));
            let spares = entries.values().filter(|e| is_spare(e)).count();
            let user_starting = entries.values().any(|e| !is_spare(e) && e.transition.is_some());
            let running = entries.values().filter(|e| e.state.is_running() || e.transition.is_some()).count();
            spares < wanted && !user_starting && running < self.registry.cap(fit)
        }

        /// Claims the settled spares not of `image_id`, to be replaced.
        pub fn claim_outdated(&self, image_id: &str) -> Vec<(String, Transition)> {
            let mut claimed = Vec::new();
            for (name, entry) in lock(&self.registry.entries).iter_mut() {
                let outdated = entry.image_id.as_deref().is_some_and(|id| id != image_id);
                if entry.role == Role::Spare && outdated && entry.is_idle_and_settled() {
                    claimed.push((name.clone(), entry.begin()));
                }
            }
            claimed
        }
    }

    /// What Docker reports, applied to the entries: its listing (at start-up, and when
    /// it comes back) and its event stream. Entries in a transition are left to it.
    pub struct Sightings<'a> {
        registry: &'a Registry,
    }

    impl Sightings<'_> {
        /// What a line of Docker's event stream means for the registry: a start the
        /// proxy did not make must be inspected (its address and incarnation are new);
        /// a death or removal makes a cached address worthless at once.
        pub fn observe(&self, event: &Event) -> Option<String> {
            // the proxy's own stop, reported after it ended: nothing new
            let stopped_already = |e: &Entry| matches!(event, Event::Die(_)) && e.state == State::Stopped;
            if let Event::Die(name) | Event::Destroy(name) = event {
                // (its own stops are the sleeper's to report; this is a crash or a kill)
                let user = lock(&self.registry.entries)
                    .get(name)
                    .filter(|e| e.transition.is_none() && !stopped_already(e))
                    .map(|e| e.user.clone());
                if let Some(user) = user {
                    self.registry.staged.lost(name, &user, "the container died or was removed");
                }
            }
            let mut entries = lock(&self.registry.entries);
            let settled = |entries: &HashMap<String, Entry>, name: &str| {
                entries.get(name).is_some_and(|e| e.transition.is_none())
            };
            match event {
                Event::Start(name) if settled(&entries, name) => return Some(name.clone()),
                Event::Die(name) | Event::Destroy(name) if settled(&entries, name) => {
                    if let Some(entry) = entries.get_mut(name).filter(|e| !stopped_already(e)) {
                        let destroyed = matches!(event, Event::Destroy(_));
                        entry.forget_place(if destroyed { State::Missing } else { State::Unknown });
                    }
                }
                Event::Rename { from, to } => {
                    if let Some(entry) = entries.get_mut(from).filter(|e| e.transition.is_none()) {
                        entry.forget_place(State::Missing);
                    }
                    if settled(&entries, to) {
                        return Some(to.clone());
                    }
                }
                _ => {}
            }
            None
        }

        /// A container someone else started, as Docker now describes it.
        pub fn started(&self, name: &str, address: Option<SocketAddr>, incarnation: Option<String>) {
            let mut entries = lock(&self.registry.entries);
            if let Some(address) = address {
                forget_address_elsewhere(&mut entries, name, address);
            }
            if let Some(entry) = entries.get_mut(name).filter(|e| e.transition.is_none()) {
                match address {
                    Some(address) => entry.seen_at(Place { address, incarnation }),
                    None => entry.forget_place(State::Unknown),
                }
                entry.stopped_at = None;
            }
        }

        /// Docker's event stream broke off (a daemon restart): nothing cached is
        /// trusted until the registry is rebuilt; every container is inspected again
        /// before traffic is routed to it.
        pub fn distrust_all(&self) {
            for entry in lock(&self.registry.entries).values_mut() {
                if entry.transition.is_none() && entry.state.is_running() {
                    entry.state = State::Unknown;
                }
            }
        }

        /// Brings the registry in line with Docker's listing of this proxy's containers
        /// (at start-up, and when Docker comes back). Entries in a transition are left
        /// to it; ones Docker no longer has, and nobody uses, become missing. (A running
        /// one without an address on the network is in doubt: inspected before use.)
        pub fn reconcile(&self, containers: &[ContainerInfo], port: u16) {
            let mut entries = lock(&self.registry.entries);
            for info in containers {
                let entry = entries.entry(info.name.clone()).or_insert_with(|| Entry::new(State::Missing));
                if entry.transition.is_some() {
                    continue;
                }
                let address = info.address.map(|ip| SocketAddr::new(ip, port));
                match (info.running, address) {
                    (true, Some(address)) => entry.seen_at(Place { address, incarnation: info.incarnation.clone() }),
                    (true, None) => entry.forget_place(State::Unknown),
                    (false, _) => {
                        entry.state = State::Stopped;
                        entry.last_address = address;
                    }
                }
                let spare = info.role == Role::Spare && info.name.contains(crate::docker::SPARE_MARK);
                entry.role = if spare { Role::Spare } else { Role::User };
                entry.image_id = Some(info.image_id.clone()).filter(|id| !id.is_empty());
                entry.created_at = info.created_at;
                entry.stopped_at = if info.running { None } else { info.finished_at };
                if entry.user.is_empty() {
                    entry.user = info.user.clone();
                }
            }
            for (name, entry) in entries.iter_mut() {
                let listed = containers.iter().any(|c| &c.name == name);
                if !listed && entry.transition.is_none() && entry.active == 0 {
                    entry.forget_place(State::Missing);
                }
            }
        }
    }

    /// The sleeper's view of the entries: which to stop and remove, and how that went.
    pub struct Sweeps<'a> {
        registry: &'a Registry,
    }

    impl Sweeps<'_> {
        /// Picks the idle containers to stop and the long-stopped ones to remove, and
        /// holds a transition on each so requests wait rather than race.
        pub fn select(&self, idle_timeout: Duration, remove_after: Option<Duration>) -> Sweep {
            let now = Instant::now();
            let mut sweep = Sweep::default();
            for (name, entry) in lock(&self.registry.entries).iter_mut() {
                // a spare is idle by design: the keeper looks after it
                if entry.role == Role::Spare || !entry.is_idle_and_settled() {
                    continue;
                }
                let idle_for = now.saturating_duration_since(entry.idle_since);
                if matches!(entry.state, State::Running(_) | State::Seen(_) | State::Unknown)
                    && idle_for >= idle_timeout
                    && self.registry.staged.may_sleep(name)
                {
                    sweep.stop.push((name.clone(), entry.begin()));
                } else if entry.state == State::Stopped && due_for_removal(entry.stopped_at, remove_after) {
                    sweep.remove.push((name.clone(), entry.begin()));
                }
            }
            sweep
        }

        /// Records how a stop ended and releases its transition; staged edits it still
        /// held (past MCP_PROXY_STAGED_EDITS_TIMEOUT) are gone with it.
        pub fn after_stop(&self, name: &str, outcome: StopOutcome) {
            let slept = !matches!(outcome, StopOutcome::Failed);
            let user = lock(&self.registry.entries).get(name).map(|e| e.user.clone()).unwrap_or_default();
            if slept {
                self.registry.staged.lost(name, &user, "put to sleep: held longer than MCP_PROXY_STAGED_EDITS_TIMEOUT");
            }
            if let Some(entry) = lock(&self.registry.entries).get_mut(name) {
                entry.transition = None;
                match outcome {
                    StopOutcome::Stopped => {
                        entry.state = State::Stopped;
                        entry.stopped_at = Some(SystemTime::now());
                    }
                    StopOutcome::Gone | StopOutcome::Retired => entry.forget_place(State::Missing),
                    StopOutcome::Failed => {}
                }
            }
        }

        /// Forgets a removed container, or releases the transition of one that was not.
        pub fn after_remove(&self, name: &str, removed: bool) {
            let mut entries = lock(&self.registry.entries);
            if removed {
                entries.remove(name);
            } else if let Some(entry) = entries.get_mut(name) {
                entry.transition = None;
            }
        }
    }

    #[cfg(test)]
    mod tests {
        use super::*;
        use crate::error::ProxyError;
        use crate::tests::{running_entry, test_proxy};
        use crate::util::lock;
        use std::net::SocketAddr;
        use std::time::{Duration, SystemTime};

        /// A registry's staged-edit marks with nothing staged and nowhere to keep them.
        fn no_staged() -> std::sync::Arc<crate::staged::Staged> {
            std::sync::Arc::new(crate::staged::Staged::open(None, Duration::from_secs(86400)))
        }

        #[test]
        fn the_least_recently_used_idle_container_makes_room() {
            let proxy = test_proxy(&[("MCP_PROXY_MAX_RUNNING", "2")]);
            let registry = &proxy.containers.registry;
            let addr: SocketAddr = "172.17.0.9:3000".parse().unwrap();
            lock(&registry.entries).insert("mcp-old".into(), running_entry(addr, 300, 0));
            lock(&registry.entries).insert("mcp-busy".into(), running_entry(addr, 900, 1));
            match registry.plan("mcp-new", "U", false, usize::MAX).unwrap() {
                Plan::Start { evict, .. } => assert_eq!(evict.as_deref(), Some("mcp-old")),
                _ => panic!("expected a start"),
            }
            // with every running container busy, the cap refuses
            let proxy = test_proxy(&[("MCP_PROXY_MAX_RUNNING", "1")]);
            let registry = &proxy.containers.registry;
            lock(&registry.entries).insert("mcp-busy".into(), running_entry(addr, 0, 1));
            let err = registry.plan("mcp-new", "U", false, usize::MAX).err().unwrap();
            assert_eq!(err.status(), 503);
            assert_eq!(err.retry_after(), Some(30));
            assert!(lock(&registry.entries)["mcp-new"].transition.is_none());
        }

        #[test]
        fn running_containers_are_routed_and_counted() {
            let proxy = test_proxy(&[]);
            let registry = &proxy.containers.registry;
            let addr: SocketAddr = "172.17.0.9:3000".parse().unwrap();
            lock(&registry.entries).insert("mcp-a".into(), running_entry(addr, 0, 0));
            let Plan::Route(lease) = registry.plan("mcp-a", "U", true, usize::MAX).unwrap() else {
                panic!("expected a route")
            };
            assert_eq!(lease.address, addr);
            {
                let entries = lock(&registry.entries);
                let entry = &entries["mcp-a"];
                assert_eq!((entry.active, entry.websockets, entry.requests_total), (1, 1, 1));
            }
            drop(lease);
            let entries = lock(&registry.entries);
            assert_eq!((entries["mcp-a"].active, entries["mcp-a"].websockets), (0, 0));
        }

        #[test]
        fn removal_is_due_only_after_remove_after() {
            let day = Duration::from_secs(86400);
            let eight_days_ago = SystemTime::now() - 8 * day;
            assert!(due_for_removal(Some(eight_days_ago), Some(7 * day)));
            assert!(!due_for_removal(Some(SystemTime::now() - day), Some(7 * day)));
            assert!(!due_for_removal(Some(eight_days_ago), None));
            assert!(!due_for_removal(None, Some(7 * day)));
        }

        #[test]
        fn the_budget_is_a_second_reason_to_be_at_cap() {
            let proxy = test_proxy(&[]);
            let registry = &proxy.containers.registry;
            let addr: SocketAddr = "172.17.0.9:3000".parse().unwrap();
            lock(&registry.entries).insert("mcp-old".into(), running_entry(addr, 300, 0));
            lock(&registry.entries).insert("mcp-recent".into(), running_entry(addr, 10, 0));
            assert!(matches!(registry.plan("mcp-new", "U", false, 3).unwrap(), Plan::Start { evict: None, .. }));
            let proxy = test_proxy(&[]);
            let registry = &proxy.containers.registry;
            lock(&registry.entries).insert("mcp-old".into(), running_entry(addr, 300, 0));
            lock(&registry.entries).insert("mcp-recent".into(), running_entry(addr, 10, 0));
            match registry.plan("mcp-new", "U", false, 2).unwrap() {
                Plan::Start { evict, .. } => assert_eq!(evict.as_deref(), Some("mcp-old")),
                _ => panic!("expected a start"),
            }
            // every one busy: 503, naming the containers that fit
            let proxy = test_proxy(&[]);
            let registry = &proxy.containers.registry;
            lock(&registry.entries).insert("mcp-busy".into(), running_entry(addr, 0, 1));
            let err = registry.plan("mcp-new", "U", false, 1).err().unwrap();
            assert!(matches!(err, ProxyError::AtCapacity(1)));
            assert_eq!(err.retry_after(), Some(30));
            // no spare boots over the budget
            assert!(!registry.spares().wanted(1, 1) && registry.spares().wanted(1, 2));
        }

        #[test]
        fn held_streams_are_capped_per_user_and_counted_with_requests_in_flight() {
            let r = std::sync::Arc::new(Registry::new(0, 0, 2, no_staged()));
            let (a, b) = (r.hold_stream("mcp-a").unwrap(), r.hold_stream("mcp-a").unwrap());
            assert!(matches!(r.hold_stream("mcp-a"), Err(ProxyError::TooManyStreams(2))));
            assert!(r.hold_stream("mcp-b").is_ok(), "another user's cap is their own");
            drop(a);
            let _c = r.hold_stream("mcp-a").unwrap();
            drop(b);
            // with an in-flight limit, held streams take its slots too
            let r = std::sync::Arc::new(Registry::new(0, 2, 0, no_staged()));
            let _held = (r.hold_stream("mcp-a").unwrap(), r.hold_stream("mcp-a").unwrap());
            assert!(matches!(r.hold_stream("mcp-a"), Err(ProxyError::UserBusy(2))));
            lock(&r.entries).insert("mcp-a".into(), running_entry("10.0.0.2:3000".parse().unwrap(), 0, 0));
            assert!(matches!(r.plan("mcp-a", "a", false, usize::MAX), Err(ProxyError::UserBusy(2))));
        }

        #[test]
        fn dockers_events_keep_the_registry_exact() {
            use crate::docker::{parse_event, Event};
            let line = |action: &str, extra: &str| {
                format!(
                    r#"{{"Type":"container","Action":"{action}","Actor":{{"ID":"abc","Attributes":{{"name":"mcp-a"{extra}}}}}}}"#
                )
            };
            assert_eq!(parse_event(&line("start", "")), Some(Event::Start("mcp-a".into())));
            assert_eq!(parse_event(&line("die", "")), Some(Event::Die("mcp-a".into())));
            assert_eq!(parse_event(&line("destroy", "")), Some(Event::Destroy("mcp-a".into())));
            assert_eq!(
                parse_event(&line("rename", r#","oldName":"/mcp-old""#)),
                Some(Event::Rename { from: "mcp-old".into(), to: "mcp-a".into() })
            );
            assert_eq!(parse_event(&line("exec_start", "")), None);
            assert_eq!(parse_event("not json"), None);

            let proxy = test_proxy(&[]);
            let registry = &proxy.containers.registry;
            let addr: SocketAddr = "172.17.0.9:3000".parse().unwrap();
            lock(&registry.entries).insert("mcp-a".into(), running_entry(addr, 0, 0));
            lock(&registry.entries).insert("mcp-b".into(), running_entry("172.17.0.10:3000".parse().unwrap(), 0, 0));
            // removed behind the proxy's back: its address is forgotten at once
            assert_eq!(registry.sightings().observe(&Event::Destroy("mcp-a".into())), None);
            assert_eq!(lock(&registry.entries)["mcp-a"].state, State::Missing);
            assert_eq!(lock(&registry.entries)["mcp-a"].last_address, None);
            // started by someone else: to be inspected
            assert_eq!(registry.sightings().observe(&Event::Start("mcp-b".into())), Some("mcp-b".into()));
            // a new container found at an address another entry still holds: that one is stale
            registry.sightings().started("mcp-a", Some("172.17.0.10:3000".parse().unwrap()), Some("i2".into()));
            let entries = lock(&registry.entries);
            assert!(entries["mcp-a"].state.is_running());
            assert_eq!(entries["mcp-b"].state, State::Unknown);
            assert_eq!(entries["mcp-b"].last_address, None);
            drop(entries);
            // nothing is routed to a container Docker started until it has answered: the
            // request that finds it waits for it (its slot already counted: no spare, no
            // room made)
            let seen = Place { address: "172.17.0.10:3000".parse().unwrap(), incarnation: Some("i2".into()) };
            assert_eq!(lock(&registry.entries)["mcp-a"].state, State::Seen(seen.clone()));
            match registry.plan("mcp-a", "U", false, usize::MAX).unwrap() {
                Plan::Start { evict: None, known, flight } => {
                    assert_eq!(known, State::Seen(seen.clone()));
                    registry.finish_transition("mcp-a", &flight, Ok(()));
                }
                _ => panic!("a container not yet seen answering was routed to"),
            }
            // once it answered, a sighting of the same place and incarnation leaves it so
            registry.mark_running("mcp-a", seen.address, seen.incarnation.clone());
            registry.sightings().started("mcp-a", Some(seen.address), seen.incarnation.clone());
            assert!(matches!(registry.plan("mcp-a", "U", false, usize::MAX).unwrap(), Plan::Route(_)));
            // a new incarnation there (Docker restarted it) is to be seen answering again
            registry.sightings().started("mcp-a", Some(seen.address), Some("i3".into()));
            assert!(matches!(lock(&registry.entries)["mcp-a"].state, State::Seen(_)));
            // the proxy's own stop, reported after it ended, leaves it stopped (not in doubt)
            lock(&registry.entries).insert("mcp-slept".into(), Entry::new(State::Stopped));
            assert_eq!(registry.sightings().observe(&Event::Die("mcp-slept".into())), None);
            assert_eq!(lock(&registry.entries)["mcp-slept"].state, State::Stopped);
            // the event stream broke off: nothing running is trusted until inspected
            registry.sightings().distrust_all();
            assert_eq!(lock(&registry.entries)["mcp-a"].state, State::Unknown);
        }
    }
}

mod docker {
    //! Owns every docker CLI call (the root-equivalent surface), as named verbs with typed
    //! results; stderr is read once, by `DockerError::classify`, and verbs match on the
    //! typed error. Calls `error` (the proxy's errors) and `util` (time), and std::process.
    use crate::error::ProxyError;
    use crate::util::parse_rfc3339;
    use serde_json::Value;
    use std::io::Read;
    use std::net::IpAddr;
    use std::process::{Command, Stdio};
    use std::thread;
    use std::time::{Duration, Instant, SystemTime};

    pub const LABEL_MANAGED: &str = "outline-mcp-proxy.managed";
    /// The proxy's prefix, exactly: a proxy adopts only containers whose label is its
    /// own (prefix `mcp-` never takes `mcp-staging-`'s).
    pub const LABEL_PREFIX: &str = "outline-mcp-proxy.prefix";
    /// The owner id the container was made for (its name is prefix + owner).
    pub const LABEL_OWNER: &str = "outline-mcp-proxy.owner";
    pub const LABEL_USER: &str = "outline-mcp-proxy.user";
    /// `spare` for a container booted ahead of time for whoever needs one next.
    pub const LABEL_ROLE: &str = "outline-mcp-proxy.role";
    /// A spare's name after the prefix: `spare-` and 16 hex digits.
    pub const SPARE_MARK: &str = "spare-";
    const CONTAINER_USER: &str = "65534:65534";
    const SHORT: Duration = Duration::from_secs(15);
    const LONG: Duration = Duration::from_secs(60);

    /// What Docker said, classified once (by `classify`); the verbs match on it.
    #[derive(Clone, Debug, PartialEq)]
    pub enum DockerError {
        NoSuchContainer,
        NameInUse,
        /// The CLI is missing or the daemon does not answer.
        Unavailable(String),
        /// The image has no such program to run (a probe's `--entrypoint`).
        NoExecutable(String),
        /// The network named does not exist.
        NoSuchNetwork(String),
        /// What was to be made (a network) exists already.
        AlreadyExists(String),
        /// The daemon answered with another error.
        Failed(String),
    }

    impl DockerError {
        pub fn classify(stderr: &str) -> DockerError {
            let s = stderr.to_ascii_lowercase();
            if s.contains("cannot connect to the docker daemon")
                || s.contains("is the docker daemon running")
                || s.contains("error during connect")
                || s.contains("connection refused")
                || s.contains("permission denied while trying to connect")
            {
                DockerError::Unavailable(first_line(stderr))
            } else if s.contains("no such container") || s.contains("no such object") {
                DockerError::NoSuchContainer
            } else if s.contains("is already in use") {
                DockerError::NameInUse
            } else if s.contains("executable file not found") || s.contains("no such file") {
                DockerError::NoExecutable(stderr.trim().to_string())
            } else if s.contains("no such network") || (s.contains("network") && s.contains("not found")) {
                DockerError::NoSuchNetwork(stderr.trim().to_string())
            } else if s.contains("already exists") {
                DockerError::AlreadyExists(stderr.trim().to_string())
            } else {
                DockerError::Failed(stderr.trim().to_string())
            }
        }

        pub fn message(&self) -> String {
            match self {
                DockerError::NoSuchContainer => "no such container".into(),
                DockerError::NameInUse => "the container name is already in use".into(),
                DockerError::Unavailable(m)
                | DockerError::NoExecutable(m)
                | DockerError::NoSuchNetwork(m)
                | DockerError::AlreadyExists(m)
                | DockerError::Failed(m) => m.clone(),
            }
        }

        /// For the client (a sentence) and the log (Docker's words); `what` names the verb.
        pub fn into_proxy_error(self, what: &str) -> ProxyError {
            match self {
                DockerError::Unavailable(m) => {
                    log::error!("docker unavailable ({what}): {m}");
                    ProxyError::DockerUnavailable("Docker is not available on the proxy host.".into())
                }
                other => {
                    let m = other.message();
                    log::error!("docker could not {what}: {m}");
                    ProxyError::ContainerFailed(format!("Docker could not {what}: {}", first_line(&m)))
                }
            }
        }
    }

    pub fn first_line(s: &str) -> String {
        s.lines().next().unwrap_or("").chars().take(300).collect()
    }

    /// Whose a container is: a user's, or a spare booted ahead of time for whoever
    /// needs one next (labelled so, and without an owner).
    #[derive(Clone, Copy, PartialEq, Eq, Debug)]
    pub enum Role {
        User,
        Spare,
    }

    impl Role {
        fn label(self) -> &'static str {
            match self {
                Role::User => "user",
                Role::Spare => "spare",
            }
        }
    }

    /// Whether Docker answered at the watcher's last look (for /health).
    #[derive(Clone, Debug, PartialEq)]
    pub enum DockerStatus {
        Answering,
        /// It did not answer when the proxy started.
        AwayAtStartUp,
        /// It stopped answering: what the last call met.
        Away(DockerError),
    }

    impl DockerStatus {
        pub fn is_answering(&self) -> bool {
            *self == DockerStatus::Answering
        }

        /// Why it is away, in one line (None while it answers).
        pub fn reason(&self) -> Option<String> {
            match self {
                DockerStatus::Answering => None,
                DockerStatus::AwayAtStartUp => Some("Docker did not answer at start-up".into()),
                DockerStatus::Away(e) => Some(first_line(&e.message())),
            }
        }
    }

    /// How a container came to be running.
    #[derive(Clone, Copy, PartialEq, Eq, Debug)]
    pub enum Wake {
        Running,
        Woken,
        Created,
    }

    impl Wake {
        pub fn as_str(self) -> &'static str {
            match self {
                Wake::Running => "running",
                Wake::Woken => "woken",
                Wake::Created => "created",
            }
        }
    }

    /// Everything `docker run` needs to make one user's container. The key is here
    /// only in `env` mode; in `header` mode it never reaches Docker.
    pub struct ContainerSpec<'a> {
        pub name: &'a str,
        pub prefix: &'a str,
        pub role: Role,
        /// Labelled only on a user's container (a spare has no owner yet).
        pub owner: &'a str,
        pub user_label: &'a str,
        pub env_key: Option<&'a str>,
        pub image: &'a str,
        pub network: &'a str,
        pub memory_bytes: u64,
        pub cpus: f64,
        pub pids_limit: u32,
        pub container_port: u16,
        pub outline_api_url: String,
        /// The parent cgroup held to the memory budget (None: no budget).
        pub cgroup_parent: Option<&'a str>,
    }

    impl ContainerSpec<'_> {
        /// The `docker run` arguments: hardening, limits, labels; never the key.
        pub fn args(&self) -> Vec<String> {
            let memory = self.memory_bytes.to_string();
            let options: Vec<(&str, String)> = vec![
                ("--name", self.name.to_string()),
                ("--label", format!("{LABEL_MANAGED}=true")),
                ("--label", format!("{LABEL_PREFIX}={}", self.prefix)),
                ("--label", format!("{LABEL_OWNER}={}", if self.role == Role::Spare { "" } else { self.owner })),
                ("--label", format!("{LABEL_ROLE}={}", self.role.label())),
                ("--label", format!("{LABEL_USER}={}", sanitize_label(self.user_label))),
                ("--restart", "unless-stopped".into()),
                ("--memory", memory.clone()),
                ("--memory-swap", memory),
                ("--cpus", self.cpus.to_string()),
                ("--pids-limit", self.pids_limit.to_string()),
                ("--cap-drop", "ALL".into()),
                ("--security-opt", "no-new-privileges".into()),
                ("--tmpfs", "/tmp:rw,noexec,nosuid,size=64m,mode=1777".into()),
                ("--user", CONTAINER_USER.into()),
                ("--log-driver", "json-file".into()),
                ("--log-opt", "max-size=5m".into()),
                ("--log-opt", "max-file=2".into()),
                ("--network", self.network.to_string()),
                ("--env", "HOME=/tmp".into()),
                ("--env", format!("OUTLINE_API_URL={}", self.outline_api_url)),
                ("--env", "MCP_TRANSPORT=streamable-http".into()),
                ("--env", "MCP_HOST=0.0.0.0".into()),
                ("--env", format!("MCP_PORT={}", self.container_port)),
            ];
            // --init: a real PID 1, so signals reach the server (a fast `docker stop`)
            // and zombies are reaped
            let mut args: Vec<String> = vec!["run".into(), "--detach".into(), "--init".into(), "--read-only".into()];
            for (flag, value) in options {
                args.push(flag.into());
                args.push(value);
            }
            args.extend(self.cgroup_parent.map(|parent| format!("--cgroup-parent={parent}")));
            if self.env_key.is_some() {
                // the value comes from the docker CLI's own environment, not argv
                args.push("--env".into());
                args.push("OUTLINE_API_KEY".into());
            }
            args.push(self.image.to_string());
            args
        }
    }

    /// Label values come from Outline's user name: keep them printable and short.
    fn sanitize_label(s: &str) -> String {
        s.chars().filter(|c| !c.is_control()).take(100).collect()
    }

    /// Adopted only when its labels say this proxy's prefix exactly and its name is
    /// that prefix and the owner its label gives.
    /// A spare carries no owner label: its name says whether it is still a spare or was
    /// taken by a user (renamed to prefix + owner id, the owner kept in the registry).
    pub fn is_ours(c: &ContainerInfo, prefix: &str) -> bool {
        let Some(rest) = c.name.strip_prefix(prefix) else { return false };
        let owned_name = rest.len() == 32 && rest.bytes().all(|b| b.is_ascii_hexdigit());
        c.prefix_label == prefix
            && if c.role == Role::Spare {
                rest.starts_with(SPARE_MARK) || owned_name
            } else {
                !c.owner_label.is_empty() && rest == c.owner_label
            }
    }

    /// A long-running child (the event stream) dies with the proxy, even a SIGKILLed
    /// one: Linux's parent-death signal, set between fork and exec.
    fn end_with_parent(command: &mut Command) {
        use std::os::unix::process::CommandExt;
        const PR_SET_PDEATHSIG: i32 = 1;
        const SIGKILL: u64 = 9;
        extern "C" {
            fn prctl(option: i32, arg2: u64, arg3: u64, arg4: u64, arg5: u64) -> i32;
        }
        // SAFETY: runs in the forked child before exec; prctl is async-signal-safe and
        // touches only the child's own process attributes.
        unsafe {
            command.pre_exec(|| match prctl(PR_SET_PDEATHSIG, SIGKILL, 0, 0, 0) {
                0 => Ok(()),
                _ => Err(std::io::Error::last_os_error()),
            });
        }
    }

    /// One line of `docker events` that the registry cares about.
    #[derive(Debug, PartialEq)]
    pub enum Event {
        Start(String),
        Die(String),
        Destroy(String),
        Rename { from: String, to: String },
    }

    pub fn parse_event(line: &str) -> Option<Event> {
        let value: Value = serde_json::from_str(line).ok()?;
        let attributes = &value["Actor"]["Attributes"];
        let name = attributes["name"].as_str()?.trim_start_matches('/').to_string();
        match value["Action"].as_str().or_else(|| value["status"].as_str())? {
            "start" => Some(Event::Start(name)),
            "die" => Some(Event::Die(name)),
            "destroy" => Some(Event::Destroy(name)),
            "rename" => {
                let from = attributes["oldName"].as_str()?.trim_start_matches('/').to_string();
                Some(Event::Rename { from, to: name })
            }
            _ => None,
        }
    }

    /// What `docker inspect` says of one container.
    #[derive(Debug, Clone)]
    pub struct ContainerInfo {
        pub name: String,
        /// Docker's id and the start time of its current process: a container that was
        /// restarted or replaced has another one, and knows none of the sessions before.
        pub incarnation: Option<String>,
        pub running: bool,
        pub restarting: bool,
        pub exit_code: i64,
        pub address: Option<IpAddr>,
        pub created_at: Option<SystemTime>,
        pub finished_at: Option<SystemTime>,
        pub user: String,
        pub prefix_label: String,
        pub owner_label: String,
        pub role: Role,
        /// The image it was made from (an id), to replace those of an older image.
        pub image_id: String,
    }

    pub fn parse_inspect(json_text: &str, network: &str) -> Vec<ContainerInfo> {
        let Ok(Value::Array(items)) = serde_json::from_str::<Value>(json_text) else {
            return Vec::new();
        };
        items
            .iter()
            .map(|c| {
                let state = &c["State"];
                let address =
                    c["NetworkSettings"]["Networks"][network]["IPAddress"].as_str().and_then(|ip| ip.parse().ok());
                let incarnation = match (c["Id"].as_str(), state["StartedAt"].as_str()) {
                    (Some(id), Some(started)) => Some(format!("{}@{started}", &id[..id.len().min(12)])),
                    _ => None,
                };
                ContainerInfo {
                    name: c["Name"].as_str().unwrap_or("").trim_start_matches('/').to_string(),
                    incarnation,
                    running: state["Running"].as_bool().unwrap_or(false),
                    restarting: state["Restarting"].as_bool().unwrap_or(false),
                    exit_code: state["ExitCode"].as_i64().unwrap_or(0),
                    address,
                    created_at: c["Created"].as_str().and_then(parse_rfc3339),
                    finished_at: state["FinishedAt"].as_str().and_then(parse_rfc3339),
                    user: c["Config"]["Labels"][LABEL_USER].as_str().unwrap_or("").to_string(),
                    prefix_label: c["Config"]["Labels"][LABEL_PREFIX].as_str().unwrap_or("").to_string(),
                    owner_label: c["Config"]["Labels"][LABEL_OWNER].as_str().unwrap_or("").to_string(),
                    role: match c["Config"]["Labels"][LABEL_ROLE].as_str() {
                        Some("spare") => Role::Spare,
                        _ => Role::User,
                    },
                    image_id: c["Image"].as_str().unwrap_or("").to_string(),
                }
            })
            .collect()
    }

    /// The docker CLI, and every verb the proxy uses it for.
    #[derive(Clone)]
    pub struct Docker {
        cli: String,
    }

    impl Docker {
        pub fn new(cli: &str) -> Docker {
            Docker { cli: cli.to_string() }
        }

        /// `docker run`; when the name is taken (another proxy, or an earlier life of
        /// this one, made it meanwhile), `docker start` of that one.
        pub fn create(&self, spec: &ContainerSpec) -> Result<Wake, DockerError> {
            let args = spec.args();
            let args: Vec<&str> = args.iter().map(String::as_str).collect();
            let env = spec.env_key.map(|key| ("OUTLINE_API_KEY", key));
            match self.run(&args, env, LONG) {
                Ok(_) => Ok(Wake::Created),
                Err(DockerError::NameInUse) => self.start(spec.name).map(|_| Wake::Woken),
                Err(e) => Err(e),
            }
        }

        /// `docker start`, or `docker run` when it turns out to have been removed.
        pub fn wake_or_create(&self, spec: &ContainerSpec) -> Result<Wake, DockerError> {
            match self.start(spec.name) {
                Ok(()) => Ok(Wake::Woken),
                Err(DockerError::NoSuchContainer) => self.create(spec),
                Err(e) => Err(e),
            }
        }

        pub fn start(&self, name: &str) -> Result<(), DockerError> {
            self.run(&["start", name], None, LONG).map(|_| ())
        }

        pub fn stop(&self, name: &str) -> Result<(), DockerError> {
            self.run(&["stop", "--time", "10", name], None, LONG).map(|_| ())
        }

        pub fn remove(&self, name: &str) -> Result<(), DockerError> {
            self.run(&["rm", name], None, LONG).map(|_| ())
        }

        /// Stops and removes at once (a container that holds nothing of its user).
        pub fn remove_force(&self, name: &str) -> Result<(), DockerError> {
            match self.run(&["rm", "--force", name], None, LONG) {
                Err(DockerError::NoSuchContainer) => Ok(()),
                other => other.map(|_| ()),
            }
        }

        /// Runs `python3 -c probe url` in a throwaway container of `image` on `network`:
        /// Ok(true) when it exits 0, Ok(false) when it fails, Err when it cannot run.
        pub fn probe_from_image(
            &self,
            image: &str,
            network: &str,
            probe: &str,
            url: &str,
        ) -> Result<bool, DockerError> {
            let args = [
                "run",
                "--rm",
                "--network",
                network,
                "--user",
                "65534:65534",
                "--read-only",
                "--cap-drop",
                "ALL",
                "--entrypoint",
                "python3",
                image,
                "-c",
                probe,
                url,
            ];
            match self.run(&args, None, LONG) {
                Ok(_) => Ok(true),
                // (a missing python3 is `NoExecutable`: the probe cannot run)
                Err(DockerError::Failed(_) | DockerError::NoSuchNetwork(_) | DockerError::AlreadyExists(_)) => {
                    Ok(false)
                }
                Err(e) => Err(e),
            }
        }

        /// A spare becomes a user's: a rename, no restart.
        pub fn rename(&self, from: &str, to: &str) -> Result<(), DockerError> {
            self.run(&["rename", from, to], None, SHORT).map(|_| ())
        }

        /// The id of the image a reference names now (after a `docker pull`, the new one).
        pub fn image_id(&self, image: &str) -> Result<String, DockerError> {
            self.run(&["image", "inspect", "--format", "{{.Id}}", image], None, SHORT).map(|v| v.trim().to_string())
        }

        pub fn set_cpus(&self, name: &str, cpus: f64) -> Result<(), DockerError> {
            self.run(&["update", "--cpus", &cpus.to_string(), name], None, SHORT).map(|_| ())
        }

        /// The container as Docker sees it, or None when it does not exist.
        pub fn inspect(&self, name: &str, network: &str) -> Result<Option<ContainerInfo>, DockerError> {
            match self.run(&["container", "inspect", name], None, SHORT) {
                Ok(out) => Ok(parse_inspect(&out, network).into_iter().next()),
                Err(DockerError::NoSuchContainer) => Ok(None),
                Err(e) => Err(e),
            }
        }

        /// This proxy's containers: labelled with its prefix exactly, and named for the
        /// owner their label gives (several proxies may share one Docker).
        pub fn list_managed(&self, network: &str, prefix: &str) -> Result<Vec<ContainerInfo>, DockerError> {
            let filter = format!("label={LABEL_PREFIX}={prefix}");
            for _ in 0..3 {
                let ids = self.run(&["ps", "--all", "--quiet", "--no-trunc", "--filter", &filter], None, SHORT)?;
                let ids: Vec<&str> = ids.split_whitespace().collect();
                if ids.is_empty() {
                    return Ok(Vec::new());
                }
                let mut args = vec!["container", "inspect"];
                args.extend(ids);
                match self.run(&args, None, SHORT) {
                    Ok(out) => {
                        return Ok(parse_inspect(&out, network).into_iter().filter(|c| is_ours(c, prefix)).collect())
                    }
                    // one was removed between ps and inspect: list again
                    Err(DockerError::NoSuchContainer) => continue,
                    Err(e) => return Err(e),
                }
            }
            Err(DockerError::Unavailable("containers kept vanishing while being listed".into()))
        }

        /// Docker's own event stream for this proxy's containers since `since` (Unix
        /// seconds), one JSON object a line; runs until Docker goes away or it is killed.
        pub fn events(&self, prefix: &str, since: u64) -> Result<std::process::Child, DockerError> {
            let filter = format!("label={LABEL_PREFIX}={prefix}");
            let mut command = Command::new(&self.cli);
            command
                .args(["events", "--filter", "type=container", "--filter", &filter, "--format", "{{json .}}"])
                .args(["--since", &since.to_string()])
                .stdin(Stdio::null())
                .stdout(Stdio::piped())
                .stderr(Stdio::null());
            end_with_parent(&mut command);
            command.spawn().map_err(|e| DockerError::Unavailable(format!("cannot run {}: {e}", self.cli)))
        }

        pub fn server_version(&self) -> Result<String, DockerError> {
            self.run(&["version", "--format", "{{.Server.Version}}"], None, SHORT).map(|v| v.trim().to_string())
        }

        /// Docker's cgroup driver and version (`cgroupfs 1`, `systemd 2`, ...).
        pub fn cgroup_setup(&self) -> Result<(String, String), DockerError> {
            let out = self.run(&["info", "--format", "{{.CgroupDriver}} {{.CgroupVersion}}"], None, SHORT)?;
            let mut words = out.split_whitespace().map(str::to_string);
            Ok((words.next().unwrap_or_default(), words.next().unwrap_or_default()))
        }

        pub fn image_present(&self, image: &str) -> Result<(), DockerError> {
            self.run(&["image", "inspect", "--format", "{{.Id}}", image], None, SHORT).map(|_| ())
        }

        /// Whether containers on the network can reach each other (ICC), or None when
        /// the network does not exist.
        pub fn network_icc(&self, network: &str) -> Result<Option<bool>, DockerError> {
            let format = "{{index .Options \"com.docker.network.bridge.enable_icc\"}}";
            match self.run(&["network", "inspect", "--format", format, network], None, SHORT) {
                Ok(out) => Ok(Some(out.trim() != "false")),
                Err(DockerError::NoSuchNetwork(_)) => Ok(None),
                Err(e) => Err(e),
            }
        }

        /// A bridge network of the proxy's own on which containers cannot reach each other.
        pub fn create_isolated_network(&self, network: &str) -> Result<(), DockerError> {
            let label = format!("{LABEL_MANAGED}=true");
            let args = [
                "network",
                "create",
                "--driver",
                "bridge",
                "--opt",
                "com.docker.network.bridge.enable_icc=false",
                "--label",
                &label,
                network,
            ];
            match self.run(&args, None, SHORT) {
                Err(DockerError::AlreadyExists(_)) => Ok(()),
                other => other.map(|_| ()),
            }
        }

        /// Runs the CLI with a time limit. `env` is the only way a secret reaches it
        /// (env key mode): by the child's environment, never by its arguments.
        fn run(&self, args: &[&str], env: Option<(&str, &str)>, timeout: Duration) -> Result<String, DockerError> {
            let mut command = Command::new(&self.cli);
            command.args(args).stdin(Stdio::null()).stdout(Stdio::piped()).stderr(Stdio::piped());
            if let Some((name, value)) = env {
                command.env(name, value);
            }
            let cli = &self.cli;
            let mut child = command.spawn().map_err(|e| DockerError::Unavailable(format!("cannot run {cli}: {e}")))?;
            let stdout = child.stdout.take().map(collect_output);
            let stderr = child.stderr.take().map(collect_output);
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
                        let verb = args.first().copied().unwrap_or("");
                        return Err(DockerError::Unavailable(format!(
                            "`docker {verb}` took longer than {}s",
                            timeout.as_secs()
                        )));
                    }
                    Err(e) => return Err(DockerError::Unavailable(format!("waiting for docker: {e}"))),
                }
            };
            let out = stdout.map(Output::join).unwrap_or_default();
            let err = stderr.map(Output::join).unwrap_or_default();
            if status.success() {
                Ok(out)
            } else {
                Err(DockerError::classify(&err))
            }
        }
    }

    /// A child's output being read: on its own thread when one could be had, else
    /// read once the child has exited (a thread limit must not fail a docker call).
    enum Output<R> {
        Reading(thread::JoinHandle<String>),
        Later(R),
    }

    fn collect_output<R: Read + Send + 'static>(source: R) -> Output<R> {
        let (tx, rx) = std::sync::mpsc::channel::<R>();
        let reader = thread::Builder::new().name("docker-out".into()).spawn(move || match rx.recv() {
            Ok(source) => read_all(source),
            Err(_) => String::new(),
        });
        match reader {
            Ok(handle) => match tx.send(source) {
                Ok(()) => Output::Reading(handle),
                Err(std::sync::mpsc::SendError(source)) => Output::Later(source),
            },
            Err(e) => {
                log::warn!("no thread to read docker's output ({e}); reading it after exit");
                Output::Later(source)
            }
        }
    }

    impl<R: Read> Output<R> {
        fn join(self) -> String {
            match self {
                Output::Reading(handle) => handle.join().unwrap_or_else(|_| {
                    log::warn!("the thread reading docker's output panicked");
                    String::new()
                }),
                Output::Later(source) => read_all(source),
            }
        }
    }

    fn read_all(mut source: impl Read) -> String {
        let mut buf = Vec::new();
        let _ = source.read_to_end(&mut buf);
        String::from_utf8_lossy(&buf).into_owned()
    }

    #[cfg(test)]
    mod tests {
        use super::*;
        use crate::util::{format_rfc3339, parse_rfc3339};

        fn spec_for<'a>(name: &'a str, user: &'a str, env_key: Option<&'a str>) -> ContainerSpec<'a> {
            ContainerSpec {
                name,
                prefix: "mcp-",
                role: Role::User,
                owner: name.strip_prefix("mcp-").unwrap_or(name),
                user_label: user,
                env_key,
                image: "img",
                network: "bridge",
                memory_bytes: 256 << 20,
                cpus: 1.0,
                pids_limit: 128,
                container_port: 3000,
                outline_api_url: "http://outline/api".into(),
                cgroup_parent: None,
            }
        }

        #[test]
        fn only_this_prefixs_containers_are_adopted() {
            let info = |name: &str, prefix: &str, owner: &str| {
                let text = format!(
                    r#"[{{"Name":"/{name}","State":{{}},"Config":{{"Labels":{{"outline-mcp-proxy.prefix":"{prefix}","outline-mcp-proxy.owner":"{owner}"}}}}}}]"#
                );
                parse_inspect(&text, "bridge").remove(0)
            };
            let owner = "0123456789abcdef0123456789abcdef";
            assert!(is_ours(&info(&format!("mcp-{owner}"), "mcp-", owner), "mcp-"));
            // a proxy with prefix mcp- leaves mcp-staging-'s alone, though the name starts with mcp-
            let staging = info(&format!("mcp-staging-{owner}"), "mcp-staging-", owner);
            assert!(!is_ours(&staging, "mcp-"));
            assert!(is_ours(&staging, "mcp-staging-"));
            // a name that does not match its owner label is not adopted
            assert!(!is_ours(&info("mcp-someone-else", "mcp-", owner), "mcp-"));
        }

        #[test]
        fn docker_errors_are_classified_once() {
            let classify = DockerError::classify;
            assert_eq!(classify("Error response from daemon: No such container: mcp-x"), DockerError::NoSuchContainer);
            assert_eq!(classify("Error: No such object: mcp-x"), DockerError::NoSuchContainer);
            assert_eq!(
                classify(
                    "docker: Error response from daemon: Conflict. The container name \"/mcp-x\" is already in use"
                ),
                DockerError::NameInUse
            );
            assert!(matches!(
                classify(
                    "Cannot connect to the Docker daemon at unix:///var/run/docker.sock. Is the docker daemon running?"
                ),
                DockerError::Unavailable(_)
            ));
            assert!(matches!(classify("invalid reference format"), DockerError::Failed(_)));
            let no_python = "exec: \"python3\": executable file not found in $PATH";
            assert!(matches!(classify(no_python), DockerError::NoExecutable(_)));
            assert!(matches!(classify("Error: No such network: net-x"), DockerError::NoSuchNetwork(_)));
            assert!(matches!(
                classify("Error response from daemon: network net-x not found"),
                DockerError::NoSuchNetwork(_)
            ));
            assert!(matches!(classify("network with name net-x already exists"), DockerError::AlreadyExists(_)));
            // the client's message is a sentence; Docker's own words stay in the log
            let err = DockerError::NoSuchContainer.into_proxy_error("start container mcp-x");
            assert_eq!((err.status(), err.code()), (503, "container_failed"));
            let err = DockerError::Unavailable("refused".into()).into_proxy_error("list containers");
            assert_eq!((err.status(), err.code()), (503, "docker_unavailable"));
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
        fn containers_run_under_the_budgets_parent_cgroup_when_there_is_one() {
            assert!(!spec_for("mcp-x", "Ann", None).args().iter().any(|a| a.starts_with("--cgroup-parent")));
            let mut spec = spec_for("mcp-x", "Ann", None);
            spec.cgroup_parent = Some("/outline_mcp_proxy");
            let args = spec.args();
            assert!(args.contains(&"--cgroup-parent=/outline_mcp_proxy".to_string()));
            assert_eq!(args.last().map(String::as_str), Some("img"), "a flag, before the image");
        }

        #[test]
        fn run_args_never_carry_the_key_and_harden_the_container() {
            for env_key in [None, Some("the-secret-key")] {
                let args = spec_for("mcp-x", "Ann", env_key).args().join(" ");
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
                assert_eq!(args.contains("--env OUTLINE_API_KEY"), env_key.is_some());
                assert!(!args.contains("OUTLINE_API_KEY=") && !args.contains("the-secret-key"));
            }
        }
    }
}

mod memory {
    //! Owns the memory budget of all user containers: its default (the host's memory less
    //! a reserve), the parent cgroup the kernel holds to it (cgroup v1 or v2, Docker's
    //! cgroupfs or systemd driver), what that parent uses now, and how many containers fit.
    //! Calls std only (the kernel's sysinfo, and `systemctl` for a systemd slice's limit).
    use std::path::PathBuf;
    use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
    use std::sync::OnceLock;
    use std::time::{Duration, Instant};

    /// What the host keeps for itself beside the containers, measured on this project's
    /// hosts: the OS (kernel, systemd, journald, sshd: ~200 MiB), dockerd (~90 MiB),
    /// containerd (~40 MiB) and one containerd-shim per awake container (~7 MiB each,
    /// outside the containers' cgroups), nginx (~12 MiB), the proxy (~5 MiB idle, 40 MiB
    /// with 300 streams), and page cache for them to run from.
    pub const RESERVE: u64 = 640 << 20;
    /// How often the parent's usage is read again (by the request that finds it stale).
    const SAMPLE_EVERY: Duration = Duration::from_secs(1);

    /// The host's memory (MemTotal), from the kernel's sysinfo(2): the unit's
    /// `ProcSubset=pid` hides /proc/meminfo from the service.
    pub fn host_memory() -> Option<u64> {
        use std::os::raw::{c_int, c_long, c_ulong, c_ushort};
        /// struct sysinfo (linux/sysinfo.h), with room to spare for its padding.
        #[repr(C)]
        struct SysInfo {
            uptime: c_long,
            loads: [c_ulong; 3],
            totalram: c_ulong,
            freeram: c_ulong,
            sharedram: c_ulong,
            bufferram: c_ulong,
            totalswap: c_ulong,
            freeswap: c_ulong,
            procs: c_ushort,
            pad: c_ushort,
            totalhigh: c_ulong,
            freehigh: c_ulong,
            mem_unit: u32,
            spare: [u8; 64],
        }
        extern "C" {
            fn sysinfo(info: *mut SysInfo) -> c_int;
        }
        let mut info = std::mem::MaybeUninit::<SysInfo>::zeroed();
        // SAFETY: sysinfo writes at most sizeof(struct sysinfo) bytes into the buffer it
        // is given, which is larger; a zeroed SysInfo is a valid value of plain integers.
        let info = unsafe {
            if sysinfo(info.as_mut_ptr()) != 0 {
                return None;
            }
            info.assume_init()
        };
        (info.totalram as u64).checked_mul(u64::from(info.mem_unit.max(1)))
    }

    /// MCP_PROXY_MEMORY_BUDGET, checked: `asked` None is the default (the host's memory
    /// less RESERVE), Some(0) is no budget. A budget must hold one container
    /// (`per_container`, MCP_PROXY_MEMORY) and no more than the host has. Rounded down to
    /// whole pages (4 KiB), as the kernel keeps a limit.
    pub fn size_budget(asked: Option<u64>, per_container: u64, host: Option<u64>) -> Result<u64, String> {
        let mib = |b: u64| b >> 20;
        let asked = asked.map(|bytes| bytes & !4095);
        let host = host.map(|bytes| bytes & !4095);
        match (asked, host) {
            (Some(0), _) => Ok(0),
            (Some(bytes), Some(host)) if bytes > host => {
                Err(format!("at most the host's memory ({} MiB), or off", mib(host)))
            }
            (Some(bytes), _) if bytes < per_container => {
                Err(format!("at least one container's MCP_PROXY_MEMORY ({} MiB), or off", mib(per_container)))
            }
            (Some(bytes), _) => Ok(bytes),
            (None, None) => Err("a size such as 1400m (this host's memory is unknown), or off".into()),
            (None, Some(host)) => match host.saturating_sub(RESERVE) {
                fits if fits >= per_container => Ok(fits),
                _ => Err(format!(
                    "a size or off: this host's {} MiB less the {} MiB reserve leaves less than one container",
                    mib(host),
                    mib(RESERVE)
                )),
            },
        }
    }

    /// How many containers fit the budget: the budget over the cost of one, where the cost
    /// is the mean usage of the containers in the parent now (never below a quarter of
    /// MCP_PROXY_MEMORY, so containers still booting, which use little yet, do not open
    /// the door to many), and MCP_PROXY_MEMORY itself while none is there to measure.
    pub fn containers_fit(budget: u64, reading: Reading, per_container: u64) -> usize {
        let cost = match reading.containers {
            0 => per_container,
            n => (reading.in_use / n as u64).max(per_container / 4),
        };
        (budget / cost.max(1)).max(1) as usize
    }

    /// Docker's cgroup driver.
    #[derive(Clone, Copy, PartialEq, Eq, Debug)]
    pub enum Driver {
        Cgroupfs,
        Systemd,
    }

    /// The parent cgroup of every user container: where Docker puts them, and where the
    /// kernel holds them to the budget.
    #[derive(Clone, Debug, PartialEq)]
    pub struct Parent {
        pub driver: Driver,
        /// cgroup v2 (one unified hierarchy), else v1 (the memory controller's own).
        pub v2: bool,
        /// `--cgroup-parent`: `/NAME` with cgroupfs, `NAME.slice` with systemd.
        pub arg: String,
        /// Its directory in the cgroup filesystem (v1: the memory controller's).
        pub dir: PathBuf,
    }

    /// What the parent holds now: its working set (usage less inactive file cache, as
    /// `docker stats` counts) and how many containers are in it.
    #[derive(Clone, Copy, Default, Debug, PartialEq)]
    pub struct Reading {
        pub in_use: u64,
        pub containers: usize,
    }

    impl Parent {
        /// From `docker info`'s CgroupDriver and CgroupVersion, and MCP_PROXY_CGROUP_PARENT.
        pub fn new(driver: &str, version: &str, name: &str) -> Result<Parent, String> {
            let driver = match driver.trim() {
                "cgroupfs" => Driver::Cgroupfs,
                "systemd" => Driver::Systemd,
                other => return Err(format!("Docker's cgroup driver {other:?} is neither cgroupfs nor systemd")),
            };
            let v2 = version.trim() == "2";
            let root = PathBuf::from(if v2 { "/sys/fs/cgroup" } else { "/sys/fs/cgroup/memory" });
            let (arg, relative) = match driver {
                Driver::Cgroupfs => (format!("/{name}"), name.to_string()),
                Driver::Systemd => (format!("{name}.slice"), slice_path(name)),
            };
            Ok(Parent { driver, v2, arg, dir: root.join(relative) })
        }

        /// The file holding the parent's memory limit: v2's `memory.max`, v1's
        /// `memory.limit_in_bytes`.
        fn limit_file(&self) -> PathBuf {
            self.dir.join(if self.v2 { "memory.max" } else { "memory.limit_in_bytes" })
        }

        /// The kernel's limit on the parent now (None: none, or the parent is not there).
        pub fn limit(&self) -> Option<u64> {
            let text = std::fs::read_to_string(self.limit_file()).ok()?;
            // v1 says "no limit" with a huge number, v2 with "max"
            text.trim().parse::<u64>().ok().filter(|&b| b < 1 << 60)
        }

        pub fn read(&self) -> Option<Reading> {
            let (usage, stat, inactive) = if self.v2 {
                ("memory.current", "memory.stat", "inactive_file")
            } else {
                ("memory.usage_in_bytes", "memory.stat", "total_inactive_file")
            };
            let usage: u64 = std::fs::read_to_string(self.dir.join(usage)).ok()?.trim().parse().ok()?;
            let stat = std::fs::read_to_string(self.dir.join(stat)).unwrap_or_default();
            let inactive = stat
                .lines()
                .find_map(|l| l.strip_prefix(inactive)?.strip_prefix(' ')?.trim().parse::<u64>().ok())
                .unwrap_or(0);
            let containers = std::fs::read_dir(&self.dir)
                .map(|dir| {
                    dir.flatten()
                        .filter(|e| e.file_type().is_ok_and(|t| t.is_dir()))
                        .filter(|e| is_container_cgroup(&e.file_name().to_string_lossy()))
                        .count()
                })
                .unwrap_or(0);
            Some(Reading { in_use: usage.saturating_sub(inactive), containers })
        }

        /// Sets the kernel's limit on the parent to `bytes` (root's work: the unit's
        /// ExecStartPre, or a proxy run as root). cgroupfs: the directory made and its
        /// limit written; systemd: the slice's MemoryMax set for this boot, and the slice started.
        pub fn apply_limit(&self, bytes: u64) -> Result<(), String> {
            match self.driver {
                Driver::Cgroupfs => {
                    use std::os::unix::fs::PermissionsExt;
                    let file = self.limit_file();
                    // readable by the service's user (the unit's UMask=0077 would make it 0700)
                    let readable = std::fs::Permissions::from_mode(0o755);
                    std::fs::create_dir_all(&self.dir)
                        .and_then(|_| std::fs::set_permissions(&self.dir, readable))
                        .and_then(|_| std::fs::write(&file, bytes.to_string()))
                        .map_err(|e| format!("cannot write {}: {e}", file.display()))
                }
                // started too, so its cgroup is there (with the limit) before any container
                Driver::Systemd => systemctl(&["set-property", "--runtime", &self.arg, &format!("MemoryMax={bytes}")])
                    .and_then(|_| systemctl(&["start", &self.arg])),
            }
        }
    }

    /// Runs `systemctl` with these arguments; its complaint as the error.
    fn systemctl(args: &[&str]) -> Result<(), String> {
        let out = std::process::Command::new("systemctl")
            .args(args)
            .output()
            .map_err(|e| format!("cannot run systemctl: {e}"))?;
        match out.status.success() {
            true => Ok(()),
            false => {
                Err(format!("systemctl {} failed: {}", args.join(" "), String::from_utf8_lossy(&out.stderr).trim()))
            }
        }
    }

    /// Is this child of the parent a container's cgroup, as Docker names them: the 64 hex
    /// digits of its id (cgroupfs driver), or `docker-<id>.scope` (systemd driver)? Nothing
    /// else in the parent (a nested slice, a scope of someone else's) counts as one.
    pub fn is_container_cgroup(name: &str) -> bool {
        let id = name.strip_prefix("docker-").and_then(|n| n.strip_suffix(".scope")).unwrap_or(name);
        id.len() == 64 && id.bytes().all(|b| b.is_ascii_hexdigit() && !b.is_ascii_uppercase())
    }

    /// A slice's place in the v2 hierarchy: each `-` in its name is a level
    /// (`a-b.slice` is `/a.slice/a-b.slice`), as systemd and runc expand it.
    pub fn slice_path(name: &str) -> String {
        let mut path = String::new();
        let mut prefix = String::new();
        for part in name.split('-') {
            prefix = if prefix.is_empty() { part.to_string() } else { format!("{prefix}-{part}") };
            path.push_str(&format!("/{prefix}.slice"));
        }
        path.trim_start_matches('/').to_string()
    }

    /// The budget as the proxy lives it: the parent (known once Docker has said its
    /// driver), the latest reading (taken again by the first caller a second on), and
    /// the count of containers put to sleep for it.
    pub struct Budget {
        /// Bytes all containers may use together; 0 = no budget.
        pub bytes: u64,
        per_container: u64,
        name: String,
        parent: OnceLock<Parent>,
        born: Instant,
        sampled_ms: AtomicU64,
        in_use: AtomicU64,
        /// The kernel's limit on the parent as last read (0: none, or the parent not there).
        kernel_limit: AtomicU64,
        fit: AtomicUsize,
        pub sleeps: AtomicU64,
    }

    impl Budget {
        /// `victim` sleeps to make room: said, and counted as a budget sleep when the
        /// budget, not MCP_PROXY_MAX_RUNNING (`max_running`, 0 = none), was the cap.
        pub fn note_room_made(&self, victim: &str, max_running: usize) {
            let fit = self.containers_fit();
            if max_running == 0 || fit < max_running {
                log::info!("at the memory budget ({fit} containers fit): stopping least recently used {victim}");
                self.sleeps.fetch_add(1, Ordering::Relaxed);
            } else {
                log::info!("at MCP_PROXY_MAX_RUNNING={max_running}: stopping least recently used {victim}");
            }
        }

        pub fn new(bytes: u64, per_container: u64, name: &str) -> Budget {
            Budget {
                bytes,
                per_container,
                name: name.to_string(),
                parent: OnceLock::new(),
                born: Instant::now(),
                sampled_ms: AtomicU64::new(0),
                in_use: AtomicU64::new(0),
                kernel_limit: AtomicU64::new(0),
                fit: AtomicUsize::new(containers_fit(bytes.max(1), Reading::default(), per_container)),
                sleeps: AtomicU64::new(0),
            }
        }

        pub fn is_on(&self) -> bool {
            self.bytes > 0
        }

        /// The parent, once Docker's driver is known; its limit set when this process
        /// may (a proxy run as root), else checked (the unit's ExecStartPre set it).
        pub fn learn_parent(&self, driver: &str, version: &str) -> Result<(), String> {
            if !self.is_on() || self.parent.get().is_some() {
                return Ok(());
            }
            let parent = Parent::new(driver, version, &self.name)?;
            if parent.limit() != Some(self.bytes) && parent.driver == Driver::Cgroupfs {
                if let Err(e) = parent.apply_limit(self.bytes) {
                    log::debug!("the proxy cannot set the budget itself: {e}");
                }
            }
            let limit = parent.limit();
            self.kernel_limit.store(limit.unwrap_or(0), Ordering::Relaxed);
            match limit {
                Some(limit) if limit == self.bytes => {
                    log::info!("memory budget {} MiB, held by the kernel on {}", self.bytes >> 20, parent.arg)
                }
                other => log::warn!(
                    "the kernel's limit on {} is {} where MCP_PROXY_MEMORY_BUDGET is {} bytes: run \
                     `outline-mcp-proxy set-budget` as root (the unit's ExecStartPre does)",
                    parent.arg,
                    other.map_or("none".into(), |l| l.to_string()),
                    self.bytes
                ),
            }
            let _ = self.parent.set(parent);
            Ok(())
        }

        /// `--cgroup-parent` for a new container (None: no budget, or not known yet).
        pub fn parent_arg(&self) -> Option<&str> {
            self.parent.get().map(|p| p.arg.as_str())
        }

        /// How many containers fit now (usize::MAX without a budget): the value the
        /// registry's plan takes. Reads the parent again when the last reading is stale.
        pub fn containers_fit(&self) -> usize {
            if !self.is_on() {
                return usize::MAX;
            }
            let now = self.born.elapsed().as_millis() as u64 + SAMPLE_EVERY.as_millis() as u64;
            let last = self.sampled_ms.load(Ordering::Relaxed);
            let stale = now.saturating_sub(last) >= SAMPLE_EVERY.as_millis() as u64;
            if stale && self.sampled_ms.compare_exchange(last, now, Ordering::Relaxed, Ordering::Relaxed).is_ok() {
                if let Some(parent) = self.parent.get() {
                    self.note_kernel_limit(parent);
                    if let Some(reading) = parent.read() {
                        self.in_use.store(reading.in_use, Ordering::Relaxed);
                        self.fit.store(containers_fit(self.bytes, reading, self.per_container), Ordering::Relaxed);
                    }
                }
            }
            self.fit.load(Ordering::Relaxed)
        }

        /// Reads the kernel's limit on the parent again; says so when it stops (or starts)
        /// being the budget, as when set-budget failed at start (the unit goes on without it).
        fn note_kernel_limit(&self, parent: &Parent) {
            let now = parent.limit().unwrap_or(0);
            let before = self.kernel_limit.swap(now, Ordering::Relaxed);
            if now != before && now == self.bytes {
                log::info!("the kernel holds {} to the memory budget again", parent.arg);
            } else if now != before && before == self.bytes {
                log::error!(
                    "the kernel's limit on {} is no longer the memory budget ({} where it is {} bytes): \
                     nothing holds the containers' sum; run `outline-mcp-proxy set-budget` as root",
                    parent.arg,
                    if now == 0 { "none".to_string() } else { now.to_string() },
                    self.bytes
                );
            }
        }

        /// The kernel's limit on the parent as last read (0: none): what /stats shows beside
        /// the budget, so a budget not held is seen.
        pub fn kernel_limit(&self) -> u64 {
            self.containers_fit();
            self.kernel_limit.load(Ordering::Relaxed)
        }

        /// Bytes the containers use now, as last read.
        pub fn in_use(&self) -> u64 {
            self.containers_fit();
            self.in_use.load(Ordering::Relaxed)
        }
    }

    #[cfg(test)]
    mod tests {
        use super::*;

        #[test]
        fn the_budget_is_sized_from_the_host_and_refuses_nonsense() {
            let container = 256 << 20;
            // a 2 GB t3.small's MemTotal: 1,940 MiB less the 640 MiB reserve
            let t3_small: u64 = 1_940 << 20;
            assert_eq!(size_budget(None, container, Some(t3_small)), Ok(1_300 << 20));
            assert_eq!(size_budget(None, container, Some(t3_small)), Ok(t3_small - RESERVE));
            assert_eq!(size_budget(Some(1_400 << 20), container, Some(t3_small)), Ok(1_400 << 20));
            assert_eq!(size_budget(Some(0), container, Some(t3_small)), Ok(0));
            // below one container, above the host, a host too small, a host unknown
            assert!(size_budget(Some(100 << 20), container, Some(t3_small)).unwrap_err().contains("one container"));
            assert!(size_budget(Some(4 << 30), container, Some(t3_small)).unwrap_err().contains("host's memory"));
            assert!(size_budget(None, container, Some(800 << 20)).unwrap_err().contains("less than one container"));
            assert!(size_budget(None, container, None).is_err());
            assert_eq!(size_budget(Some(1 << 30), container, None), Ok(1 << 30));
            assert_eq!(size_budget(Some((1 << 30) + 4095), container, None), Ok(1 << 30), "whole pages");
        }

        #[test]
        fn containers_fit_by_the_measured_mean_with_a_floor() {
            let mib = |n: u64| n << 20;
            // nothing to measure yet: one container's limit each
            assert_eq!(containers_fit(mib(1000), Reading { in_use: 0, containers: 0 }, mib(256)), 3);
            // two settled at 100 MiB each
            assert_eq!(containers_fit(mib(1000), Reading { in_use: mib(200), containers: 2 }, mib(256)), 10);
            // two still booting (10 MiB each): a quarter of the limit each
            assert_eq!(containers_fit(mib(1000), Reading { in_use: mib(20), containers: 2 }, mib(256)), 15);
            assert_eq!(containers_fit(mib(100), Reading { in_use: mib(900), containers: 2 }, mib(256)), 1);
        }

        #[test]
        fn the_parent_cgroup_for_each_driver_and_version() {
            let v1 = Parent::new("cgroupfs", "1", "outline_mcp_proxy").unwrap();
            assert_eq!((v1.driver, v1.v2, v1.arg.as_str()), (Driver::Cgroupfs, false, "/outline_mcp_proxy"));
            assert_eq!(v1.dir, std::path::Path::new("/sys/fs/cgroup/memory/outline_mcp_proxy"));
            let v2 = Parent::new("cgroupfs", "2", "omp").unwrap();
            assert_eq!(v2.dir, std::path::Path::new("/sys/fs/cgroup/omp"));
            let slice = Parent::new("systemd", "2", "outline_mcp_proxy").unwrap();
            assert_eq!(slice.arg, "outline_mcp_proxy.slice");
            assert_eq!(slice.dir, std::path::Path::new("/sys/fs/cgroup/outline_mcp_proxy.slice"));
            let nested = Parent::new("systemd", "2", "mcp-users").unwrap();
            assert_eq!(nested.dir, std::path::Path::new("/sys/fs/cgroup/mcp.slice/mcp-users.slice"));
            assert_eq!(slice_path("a-b-c"), "a.slice/a-b.slice/a-b-c.slice");
            let v1_slice = Parent::new("systemd", "1", "omp").unwrap();
            assert_eq!(v1_slice.dir, std::path::Path::new("/sys/fs/cgroup/memory/omp.slice"));
            assert!(Parent::new("none", "1", "omp").is_err());
        }

        #[test]
        fn only_dockers_containers_count_in_the_parent() {
            let id = "0123456789abcdef".repeat(4);
            assert!(is_container_cgroup(&id));
            assert!(is_container_cgroup(&format!("docker-{id}.scope")));
            assert!(!is_container_cgroup("omp-other.slice"), "a nested slice");
            assert!(!is_container_cgroup("session-4.scope"));
            assert!(!is_container_cgroup(&id[1..]));
            assert!(!is_container_cgroup(&id.to_uppercase()));
            assert!(!is_container_cgroup(&format!("docker-{id}.scope.extra")));
        }
    }
}

mod containers {
    //! Owns bringing a user's container to running and ready (one start per user, the
    //! boot burst, the readiness poll) and putting one to sleep. Calls `registry` for
    //! every decision, `docker` for every act, `memory` for how many containers fit;
    //! `sessions` is told of each start, and `config`, `auth` (the user), `error` and
    //! `util` are read.
    use crate::auth::{Credential, User};
    use crate::config::{Config, KeyMode};
    use crate::docker::{ContainerInfo, ContainerSpec, Docker, DockerError, DockerStatus, Role, Wake};
    use crate::error::ProxyError;
    use crate::memory::Budget;
    use crate::registry::{Lease, Place, Plan, Registry, State, StopOutcome, TransitionResult};
    use crate::sessions::Sessions;
    use crate::util::{agent_base, lock};
    use std::net::SocketAddr;
    use std::sync::atomic::{AtomicBool, Ordering};
    use std::sync::Condvar;
    use std::sync::{Arc, Mutex};
    use std::thread;
    use std::time::{Duration, Instant};

    /// The container a request wants: its name, its owner's label, and the key only
    /// where the container is to hold it (`env` mode).
    pub struct Want {
        pub name: String,
        pub user_label: String,
        pub env_key: Option<String>,
    }

    impl Want {
        pub fn new(cfg: &Config, name: String, user: &User, credential: &Credential) -> Want {
            let env_key = (cfg.key_mode == KeyMode::Env).then(|| credential.key.clone());
            Want { name, user_label: user.name.clone(), env_key }
        }

        /// How the container is made: Docker's recipe from the settings, under the
        /// budget's parent cgroup when there is one.
        pub fn spec<'a>(&'a self, cfg: &'a Config, cgroup_parent: Option<&'a str>) -> ContainerSpec<'a> {
            ContainerSpec {
                name: &self.name,
                prefix: &cfg.prefix,
                role: Role::User,
                owner: self.name.strip_prefix(cfg.prefix.as_str()).unwrap_or(&self.name),
                user_label: &self.user_label,
                env_key: self.env_key.as_deref(),
                image: &cfg.image,
                network: &cfg.network,
                memory_bytes: cfg.memory_bytes,
                cpus: cfg.boot_cpus(),
                pids_limit: cfg.pids_limit,
                container_port: cfg.container_port,
                outline_api_url: format!("{}/api", cfg.container_outline_url),
                cgroup_parent,
            }
        }
    }

    pub struct Containers {
        pub cfg: Config,
        pub registry: Arc<Registry>,
        pub docker: Docker,
        /// Told when a container starts, so held notification streams attach again.
        pub sessions: Arc<Sessions>,
        /// Whether Docker answered at the watcher's last look (for /health).
        pub docker_status: Mutex<DockerStatus>,
        /// Asks Docker and the container itself how it is.
        pub inspector: Inspector,
        /// The current image's id, as last seen.
        images: Images,
        /// Raised when a spare was taken or a container retired: the keeper looks.
        spare_signal: Signal,
        /// The CPU limits: the boot burst, then the steady one.
        pub cpus: BootBurst,
        /// MCP_PROXY_MEMORY_BUDGET: how many containers fit, and the parent cgroup.
        pub budget: Budget,
    }

    /// What Docker and the container itself say of a container: Docker's inspect, its
    /// address on the network, whether its READY_PATH answers.
    pub struct Inspector {
        docker: Docker,
        network: String,
        port: u16,
        ready_path: String,
        start_timeout: Duration,
        agent: ureq::Agent,
    }

    impl Inspector {
        fn new(cfg: &Config) -> Inspector {
            Inspector {
                docker: Docker::new(&cfg.docker),
                network: cfg.network.clone(),
                port: cfg.container_port,
                ready_path: cfg.ready_path.clone(),
                start_timeout: cfg.start_timeout,
                // the readiness probe: short, never pooled
                agent: agent_base()
                    .timeout_global(Some(Duration::from_secs(2)))
                    .max_idle_connections(0)
                    .build()
                    .new_agent(),
            }
        }

        pub fn inspect(&self, name: &str) -> Result<Option<ContainerInfo>, ProxyError> {
            self.docker
                .inspect(name, &self.network)
                .map_err(|e| e.into_proxy_error(&format!("inspect container {name}")))
        }

        /// Where the container listens now that it runs, and what Docker says of it.
        pub fn running_address(&self, name: &str) -> Result<(SocketAddr, ContainerInfo), ProxyError> {
            let info = self
                .inspect(name)?
                .ok_or_else(|| ProxyError::ContainerFailed(format!("Container {name} vanished while starting.")))?;
            match (info.address, info.restarting || !info.running) {
                (Some(ip), false) => Ok((SocketAddr::new(ip, self.port), info)),
                (_, true) => Err(ProxyError::ContainerFailed(format!(
                    "Container {name} exited (code {}) as it started; see `docker logs {name}`.",
                    info.exit_code
                ))),
                (None, false) => Err(ProxyError::ContainerFailed(format!(
                    "Container {name} has no address on network {}.",
                    self.network
                ))),
            }
        }

        /// Polls READY_PATH every 25 ms until it answers, the container exits, is removed
        /// or moves, or START_TIMEOUT passes. Gives the incarnation found answering.
        pub fn wait_until_ready(&self, name: &str, address: SocketAddr) -> Result<Option<String>, ProxyError> {
            let url = format!("http://{address}{}", self.ready_path);
            let deadline = Instant::now() + self.start_timeout;
            let mut last_exit_check = Instant::now();
            loop {
                if let Ok(response) = self.agent.get(&url).call() {
                    if response.status().as_u16() < 500 {
                        return self.confirm_still_at(name, address);
                    }
                }
                if Instant::now() >= deadline {
                    return Err(ProxyError::StartTimeout(format!(
                        "Container {name} did not become ready within {}s.",
                        self.start_timeout.as_secs()
                    )));
                }
                if last_exit_check.elapsed() > Duration::from_secs(1) {
                    last_exit_check = Instant::now();
                    // still on its way there, or between two runs: wait on
                    if let Whereabouts::Lost(e) = self.whereabouts(name, address)? {
                        return Err(e);
                    }
                }
                thread::sleep(Duration::from_millis(25));
            }
        }

        /// Where Docker finds a container awaited at `address` (one inspect): the one
        /// judgement both the wait and its end are made by.
        fn whereabouts(&self, name: &str, address: SocketAddr) -> Result<Whereabouts, ProxyError> {
            let Some(info) = self.inspect(name)? else {
                return Ok(Whereabouts::Lost(ProxyError::ContainerFailed(format!(
                    "Container {name} was removed before it was ready."
                ))));
            };
            Ok(match info {
                _ if info.running && info.address == Some(address.ip()) => Whereabouts::There(info.incarnation),
                _ if info.restarting => Whereabouts::Restarting,
                _ if !info.running => Whereabouts::Lost(exited_before_ready(name, info.exit_code)),
                _ => Whereabouts::Lost(no_longer_at(name, address)),
            })
        }

        /// An answer at the address proves the container ready only while the container
        /// still runs there: the address of one that exited at start may already be given
        /// to another user's container, which would then answer (and get this user's key).
        /// Its incarnation is the one that answered (Docker may have restarted it there).
        fn confirm_still_at(&self, name: &str, address: SocketAddr) -> Result<Option<String>, ProxyError> {
            match self.whereabouts(name, address)? {
                Whereabouts::There(incarnation) => Ok(incarnation),
                Whereabouts::Restarting => Err(no_longer_at(name, address)),
                Whereabouts::Lost(e) => Err(e),
            }
        }
    }

    /// Where Docker finds a container the proxy waits for.
    enum Whereabouts {
        /// Running at the awaited address, in this incarnation.
        There(Option<String>),
        /// Between two runs (Docker's restart policy): it may yet answer there.
        Restarting,
        /// Exited, removed, or running at another address: not to be waited for.
        Lost(ProxyError),
    }

    fn no_longer_at(name: &str, address: SocketAddr) -> ProxyError {
        ProxyError::ContainerFailed(format!(
            "Container {name} is no longer at {address}: what answers there is not it."
        ))
    }

    fn exited_before_ready(name: &str, exit_code: i64) -> ProxyError {
        ProxyError::ContainerFailed(format!(
            "Container {name} exited (code {exit_code}) before it was ready; see `docker logs {name}`."
        ))
    }

    /// The id of the image MCP_PROXY_IMAGE names, as last seen.
    struct Images {
        docker: Docker,
        image: String,
        current: Mutex<Option<String>>,
    }

    impl Images {
        fn new(cfg: &Config) -> Images {
            Images { docker: Docker::new(&cfg.docker), image: cfg.image.clone(), current: Mutex::new(None) }
        }

        /// The id of the image MCP_PROXY_IMAGE names now (after a `docker pull`, the new
        /// one); remembered for when Docker does not answer.
        fn current(&self) -> Option<String> {
            match self.docker.image_id(&self.image) {
                Ok(id) => {
                    *lock(&self.current) = Some(id.clone());
                    Some(id)
                }
                Err(_) => lock(&self.current).clone(),
            }
        }

        fn is_older(&self, image_id: &str) -> bool {
            let cached = lock(&self.current).clone();
            let current = cached.or_else(|| self.current());
            current.is_some_and(|now| !image_id.is_empty() && image_id != now)
        }
    }

    /// A flag one thread raises and another waits for.
    struct Signal(Mutex<bool>, Condvar);

    impl Signal {
        fn raise(&self) {
            *lock(&self.0) = true;
            self.1.notify_all();
        }

        /// Waits until raised, or `limit` passed; lowers it.
        fn wait(&self, limit: Duration) {
            let guard = lock(&self.0);
            let (mut guard, _) =
                self.1.wait_timeout_while(guard, limit, |raised| !*raised).unwrap_or_else(|e| e.into_inner());
            *guard = false;
        }
    }

    /// The boot burst: MCP_PROXY_BOOT_CPUS while a container boots, MCP_PROXY_CPUS once
    /// it is ready.
    pub struct BootBurst {
        docker: Docker,
        on: bool,
        boot: f64,
        steady: f64,
    }

    impl BootBurst {
        fn new(cfg: &Config) -> BootBurst {
            let docker = Docker::new(&cfg.docker);
            BootBurst { docker, on: cfg.has_boot_burst(), boot: cfg.boot_cpus(), steady: cfg.cpus }
        }

        /// After a boot with the burst, the steady CPU limit: off the request path when
        /// a thread can be had, else at once.
        pub fn settle(&self, name: &str) {
            if !self.on {
                return;
            }
            let (docker, name, cpus) = (self.docker.clone(), name.to_string(), self.steady);
            let lower = move || {
                if let Err(e) = docker.set_cpus(&name, cpus) {
                    log::warn!("could not lower the CPU limit of {name}: {}", e.message());
                }
            };
            let spare = lower.clone();
            if let Err(e) = thread::Builder::new().name("cpu-settle".into()).spawn(lower) {
                log::warn!("no thread to lower a CPU limit ({e}); lowering it now");
                spare();
            }
        }

        /// Before a stopped container's next wake, give it the boot burst back.
        fn arm(&self, name: &str) {
            if self.on {
                if let Err(e) = self.docker.set_cpus(name, self.boot) {
                    log::warn!("could not raise the boot CPU limit of {name}: {}", e.message());
                }
            }
        }
    }

    impl Containers {
        pub fn new(cfg: &Config, sessions: Arc<Sessions>) -> Containers {
            Containers {
                cfg: cfg.clone(),
                sessions,
                registry: Arc::new(Registry::new(
                    cfg.max_running,
                    cfg.user_max_inflight,
                    cfg.user_max_streams,
                    Arc::new(crate::staged::Staged::open(cfg.state_dir.clone(), cfg.staged_edits_timeout)),
                )),
                docker: Docker::new(&cfg.docker),
                inspector: Inspector::new(cfg),
                docker_status: Mutex::new(DockerStatus::Answering),
                images: Images::new(cfg),
                spare_signal: Signal(Mutex::new(false), Condvar::new()),
                cpus: BootBurst::new(cfg),
                budget: Budget::new(cfg.memory_budget, cfg.memory_bytes, &cfg.cgroup_parent),
            }
        }

        /// A lease on the user's running container: routes to it when running, else
        /// waits for the start already under way, else starts it (one start per user).
        pub fn acquire(&self, want: &Want, websocket: bool, stopping: &AtomicBool) -> Result<Lease, ProxyError> {
            let deadline = Instant::now() + self.cfg.start_timeout + Duration::from_secs(30);
            loop {
                if stopping.load(Ordering::SeqCst) {
                    return Err(ProxyError::ShuttingDown);
                }
                match self.registry.plan(&want.name, &want.user_label, websocket, self.budget.containers_fit())? {
                    Plan::Route(lease) => return Ok(lease),
                    Plan::Wait(flight) => flight.wait()?,
                    Plan::Start { flight, evict, known } => {
                        let result = self.bring_up(want, evict, known);
                        self.registry.finish_transition(&want.name, &flight, result.clone());
                        result?;
                    }
                    Plan::TakeSpare { flight, spare } => {
                        let result = self.take_spare(want, &spare);
                        self.registry.finish_transition(&want.name, &flight, result.clone());
                        result?;
                    }
                }
                if Instant::now() > deadline {
                    return Err(ProxyError::StartTimeout("The container did not settle in time.".into()));
                }
            }
        }

        /// Waits until a spare is wanted, or `limit` passed.
        pub fn wait_spare_wanted(&self, limit: Duration) {
            self.spare_signal.wait(limit);
        }

        /// The id of the image MCP_PROXY_IMAGE names now (after a `docker pull`, the new
        /// one); remembered for when Docker does not answer.
        pub fn current_image(&self) -> Option<String> {
            self.images.current()
        }

        /// Whether a container was made from an image other than the current one.
        fn outdated(&self, name: &str) -> bool {
            self.registry.image_of(name).is_some_and(|had| self.images.is_older(&had))
        }

        /// Stops a container whose transition the caller holds, arms its boot burst for
        /// the next wake, and records the outcome (the caller finishes the flight). Used
        /// by the sleeper and by the cap's eviction alike.
        pub fn put_to_sleep(&self, name: &str) {
            if self.cfg.spares > 0 || self.outdated(name) {
                // it holds nothing of its user (header mode) or is of an older image: a
                // spare of the current image serves the next wake
                let outcome = match self.docker.remove_force(name) {
                    Ok(()) => {
                        log::info!("removed idle container {name} (the next wake takes a spare)");
                        StopOutcome::Retired
                    }
                    Err(e) => {
                        log::warn!("could not remove {name}: {}", e.message());
                        StopOutcome::Failed
                    }
                };
                self.registry.sweeps().after_stop(name, outcome);
                self.spare_signal.raise();
                return;
            }
            let outcome = match self.docker.stop(name) {
                Ok(()) => {
                    log::info!("stopped idle container {name}");
                    self.cpus.arm(name);
                    StopOutcome::Stopped
                }
                Err(DockerError::NoSuchContainer) => StopOutcome::Gone,
                Err(e) => {
                    log::warn!("could not stop {name}: {}", e.message());
                    StopOutcome::Failed
                }
            };
            self.registry.sweeps().after_stop(name, outcome);
        }

        pub fn docker_status(&self) -> DockerStatus {
            lock(&self.docker_status).clone()
        }
    }

    /// How a user's container comes up, by what the registry knew: one Docker started is
    /// confirmed where it runs, a spare is taken, a stopped one woken (or replaced when
    /// of an older image), a missing one made; then waited for until it answers.
    impl Containers {
        /// Brings the container to running and ready, stopping `evict` first when the
        /// cap asks for room. Runs without the registry lock.
        fn bring_up(&self, want: &Want, evict: Option<String>, known: State) -> TransitionResult {
            if let Some(victim) = evict {
                self.budget.note_room_made(&victim, self.cfg.max_running);
                self.put_to_sleep(&victim);
            }
            let name = &want.name;
            let known = match known {
                State::Seen(place) => match self.confirm_seen(name, place) {
                    Ok(()) => return Ok(()),
                    // it never answered within START_TIMEOUT, or Docker is away: not
                    // waited for a second time
                    Err(e @ (ProxyError::StartTimeout(_) | ProxyError::DockerUnavailable(_))) => return Err(e),
                    // exited, removed or moved meanwhile: looked at afresh (woken or made)
                    Err(_) => State::Unknown,
                },
                other => other,
            };
            let begun = Instant::now();
            let how = self.wake(want, known)?;
            let (address, info) = self.inspector.running_address(name)?;
            self.registry.note_address(name, address, info.created_at);
            self.registry.note_image(name, &info.image_id);
            let incarnation = self.inspector.wait_until_ready(name, address)?;
            if how != Wake::Running {
                log::info!("container {name} {} and ready in {}ms", how.as_str(), begun.elapsed().as_millis());
                self.cpus.settle(name);
            }
            self.registry.mark_running(name, address, incarnation);
            // held notification streams may attach again
            self.sessions.notify_change();
            Ok(())
        }

        /// A container Docker started without the proxy: waited for until it answers at
        /// the place Docker gave, then routed to.
        fn confirm_seen(&self, name: &str, place: Place) -> TransitionResult {
            let begun = Instant::now();
            let incarnation = self.inspector.wait_until_ready(name, place.address)?;
            log::info!("container {name} (started by Docker) ready in {}ms", begun.elapsed().as_millis());
            self.registry.mark_running(name, place.address, incarnation);
            self.sessions.notify_change();
            Ok(())
        }

        /// Makes a ready spare the user's container: a rename (the user's old container,
        /// if one is left, removed first), no restart; a new spare boots behind it. When
        /// the spare cannot be had, the container is made the ordinary way.
        fn take_spare(&self, want: &Want, spare: &str) -> TransitionResult {
            let begun = Instant::now();
            let renamed = match self.docker.rename(spare, &want.name) {
                Err(DockerError::NameInUse) => {
                    self.docker.remove_force(&want.name).and_then(|_| self.docker.rename(spare, &want.name))
                }
                other => other,
            };
            match renamed {
                Ok(()) => {
                    self.registry.spares().adopt(spare, &want.name);
                    log::info!("container {} took spare {spare} in {}ms", want.name, begun.elapsed().as_millis());
                    self.sessions.notify_change();
                    self.spare_signal.raise();
                    Ok(())
                }
                Err(e) => {
                    log::warn!("could not take spare {spare}: {}", e.message());
                    self.registry.spares().release(spare, e == DockerError::NoSuchContainer);
                    self.bring_up(want, None, State::Unknown)
                }
            }
        }

        /// A stopped container of an older image is never woken: it is replaced by
        /// one of the current image.
        fn replace(&self, want: &Want, spec: &ContainerSpec) -> Result<Wake, ProxyError> {
            log::info!("replacing {}: {} is now another image", want.name, self.cfg.image);
            // a container of the old image left in place would meet the create as
            // NameInUse and be started instead: a failed removal fails the wake
            match self.docker.remove_force(&want.name) {
                Ok(()) | Err(DockerError::NoSuchContainer) => {}
                Err(e) => return Err(e.into_proxy_error(&format!("remove outdated container {}", want.name))),
            }
            self.docker.create(spec).map_err(|e| e.into_proxy_error(&format!("create container {}", want.name)))
        }

        /// What the registry knows saves a docker call on the way (tens of ms): a known
        /// stopped container is started, a never-seen one created; only when in doubt
        /// (a failed connection, a failed start) is Docker asked first.
        fn wake(&self, want: &Want, known: State) -> Result<Wake, ProxyError> {
            let spec = want.spec(&self.cfg, self.budget.parent_arg());
            if known == State::Stopped && self.outdated(&want.name) {
                return self.replace(want, &spec);
            }
            let result = match known {
                State::Stopped => self.docker.wake_or_create(&spec),
                State::Missing => self.docker.create(&spec),
                // (a death Docker reported since start-up leaves the state unknown:
                // the image is checked here too)
                State::Running(_) | State::Seen(_) | State::Unknown => {
                    match self.docker.inspect(&want.name, &self.cfg.network) {
                        Ok(None) => self.docker.create(&spec),
                        Ok(Some(info)) if info.running => Ok(Wake::Running),
                        Ok(Some(info)) if self.images.is_older(&info.image_id) => return self.replace(want, &spec),
                        Ok(Some(_)) => self.docker.wake_or_create(&spec),
                        Err(e) => Err(e),
                    }
                }
            };
            result.map_err(|e| e.into_proxy_error(&format!("start container {}", want.name)))
        }
    }

    #[cfg(test)]
    mod tests {
        use super::*;
        use crate::auth::{Credential, User};
        use crate::config::{Config, KeyMode};
        use crate::tests::env;

        #[test]
        fn only_env_mode_lets_the_key_into_container_code() {
            let user = User { id: "u".into(), team_id: "t".into(), name: "Ann".into(), email: String::new() };
            let credential = Credential { key: "k-123".into() };
            for (mode, holds) in [("header", false), ("env", true)] {
                let cfg = Config::load(&env(&[("MCP_PROXY_KEY_MODE", mode)])).unwrap();
                let want = Want::new(&cfg, "mcp-x".into(), &user, &credential);
                assert_eq!(want.env_key.is_some(), holds, "{mode}");
            }
            assert_eq!(Config::load(&env(&[])).unwrap().key_mode, KeyMode::Header);
        }
    }
}

mod relay {
    //! Owns carrying an HTTP request to its container and the answer back, streamed both
    //! ways: send → classify the failure → one retry, on a fresh lease, when the container
    //! never answered → the session opened again when the container does not know it → the
    //! answer streamed (2026-07-28 results stamped; an edit's answer told to `staged`).
    //! Calls `wire`, `error`, `auth` (the credential), `containers` (a fresh lease),
    //! `registry`, `protocol`, `sessions`, `staged`, `reopen`, `modern` (stamps),
    //! `upstream`.
    use crate::auth::{describe_ureq_error, Credential};
    use crate::containers::Want;
    use crate::error::ProxyError;
    use crate::modern::{copy_stamped_events, send_stamped_json, server_info};
    use crate::protocol::{self, McpPost};
    use crate::registry::Lease;
    use crate::reopen::{close_evicted, note_session, reopen_session};
    use crate::sessions::{self, Route, SESSION_HEADER};
    use crate::upstream::{
        body_length, client_gone, is_event_stream, request_headers, response_headers, seconds_rounded_up, Upstream,
        CAPTURE_LIMIT,
    };
    use crate::wire::{self, reject, Framing, Incoming, RouteResult};
    use crate::{InFlight, Proxy};
    use serde_json::Value;
    use std::io::{self, Read, Write};
    use std::net::{Shutdown, SocketAddr, TcpStream};
    use std::sync::Arc;
    use std::time::Duration;

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

    /// Why a request found no answer upstream.
    enum Failure {
        /// The client's side failed (its body too large, too slow, unreadable).
        Client(ProxyError),
        /// No answer at all: refused, reset, or a kept-alive connection to a container
        /// that has since died. `resendable` when none of the client's body was used.
        NeverAnswered { resendable: bool, error: ProxyError },
        /// The container took the request and failed it.
        Failed(ProxyError),
    }

    fn classify(e: ureq::Error, client_fault: Option<ProxyError>, body_read: u64, waited: Duration) -> Failure {
        if let Some(fault) = client_fault {
            return Failure::Client(fault);
        }
        let unreachable = |e: &ureq::Error| {
            ProxyError::ContainerUnreachable(format!(
                "The container could not be reached ({}).",
                describe_ureq_error(e)
            ))
        };
        match e {
            ureq::Error::ConnectionFailed | ureq::Error::Io(_) | ureq::Error::Timeout(ureq::Timeout::Connect) => {
                Failure::NeverAnswered { resendable: body_read == 0, error: unreachable(&e) }
            }
            ureq::Error::Timeout(ureq::Timeout::RecvResponse) => Failure::Failed(ProxyError::GatewayTimeout(format!(
                "The container did not answer within {}s.",
                seconds_rounded_up(waited)
            ))),
            other => Failure::Failed(unreachable(&other)),
        }
    }

    /// Largest request body kept in memory so that it can be sent again (after a new
    /// upstream session is opened): a JSON-RPC message is far smaller. Larger bodies
    /// stream through and are sent once.
    const REPLAY_LIMIT: u64 = 1 << 20;

    /// The body the container gets.
    enum Outgoing {
        None,
        /// Read whole (a JSON-RPC message of declared length): can be sent again.
        Bytes(Vec<u8>),
        /// Streamed from the client as it arrives: can be sent once.
        Stream,
    }

    impl Outgoing {
        /// The MCP message already read, else a small POST body read whole; others stream.
        fn take(
            request: &mut tiny_http::Request,
            incoming: &Incoming,
            max_body: u64,
            post: Option<McpPost>,
        ) -> Result<Outgoing, ProxyError> {
            if let Some(post) = post {
                return Ok(Outgoing::Bytes(post.bytes));
            }
            if !incoming.has_body() {
                return Ok(Outgoing::None);
            }
            match incoming.declared_length() {
                Some(len) if incoming.method == "POST" && len <= REPLAY_LIMIT.min(max_body) => {
                    let mut bytes = Vec::with_capacity(len as usize);
                    let mut body = BodyReader { inner: request.as_reader(), read: 0, max: max_body, fault: None };
                    match body.read_to_end(&mut bytes) {
                        Ok(_) => Ok(Outgoing::Bytes(bytes)),
                        Err(_) => Err(body
                            .fault
                            .unwrap_or_else(|| ProxyError::BadRequest("The request body could not be read.".into()))),
                    }
                }
                _ => Ok(Outgoing::Stream),
            }
        }

        fn resendable(&self) -> bool {
            !matches!(self, Outgoing::Stream)
        }
    }

    /// How an MCP message is to be forwarded, as the front door planned it.
    #[derive(Default)]
    pub struct Forward {
        /// The POST's message, parsed once (None: not an MCP POST).
        pub post: Option<McpPost>,
        /// On the user's default upstream session: the client sent no session id.
        pub on_default: bool,
        /// A 2026-07-28 request: results stamped with the server's identity, and no
        /// session id ever shown to the client.
        pub stateless: bool,
    }

    /// Sends the request, with `session` as its Mcp-Session-Id when given, and waits
    /// for the head of the container's answer.
    fn send_upstream(
        upstream: &Upstream,
        request: &mut tiny_http::Request,
        body: &Outgoing,
        incoming: &Incoming,
        credential: &Credential,
        address: SocketAddr,
        session: Option<&str>,
    ) -> Result<ureq::http::Response<ureq::Body>, Failure> {
        let headers = request_headers(incoming, upstream.forward_key(credential), address, session);
        let url = format!("http://{address}{}", incoming.target);
        let mut builder = ureq::http::Request::builder().method(incoming.method.as_str()).uri(&url);
        for (name, value) in &headers {
            builder = builder.header(name.as_str(), value.as_str());
        }
        if let Some(cl) = incoming.header("content-length") {
            builder = builder.header("Content-Length", cl.trim());
        }
        let (parts, ()) = builder
            .body(())
            .map_err(|_| Failure::Client(ProxyError::BadRequest("The request cannot be forwarded as sent.".into())))?
            .into_parts();
        let waited = upstream.response_timeout;
        match body {
            Outgoing::None => {
                upstream.agent.run(ureq::http::Request::from_parts(parts, ())).map_err(|e| classify(e, None, 0, waited))
            }
            Outgoing::Bytes(bytes) => upstream
                .agent
                .run(ureq::http::Request::from_parts(parts, bytes.as_slice()))
                .map_err(|e| classify(e, None, 0, waited)),
            Outgoing::Stream => {
                let mut body = BodyReader { inner: request.as_reader(), read: 0, max: upstream.max_body, fault: None };
                let sendable = ureq::SendBody::from_reader(&mut body);
                let result = upstream.agent.run(ureq::http::Request::from_parts(parts, sendable));
                result.map_err(|e| classify(e, body.fault.take(), body.read, waited))
            }
        }
    }

    /// Send → classify the failure → one retry with a fresh lease when the container
    /// never answered and the request can be sent again whole; a session the container
    /// does not know (or the proxy knows it cannot) is opened again → stream the answer.
    pub fn proxy_http(
        proxy: &Arc<Proxy>,
        mut request: tiny_http::Request,
        incoming: &Incoming,
        credential: &Credential,
        want: &Want,
        mut lease: Lease,
        forward: Forward,
    ) -> RouteResult {
        let socket = request.socket();
        let route = match forward.on_default {
            true => proxy.sessions.default_route(&want.name, lease.incarnation.as_deref()),
            false => proxy.sessions.route(incoming.header(SESSION_HEADER), &want.name, lease.incarnation.as_deref()),
        };
        let init_params = forward.post.as_ref().and_then(McpPost::initialize_params);
        let edit = staged_edit_call(forward.post.as_ref());
        let method = forward.post.as_ref().map(|post| post.method().to_string()).unwrap_or_default();
        let body = match Outgoing::take(&mut request, incoming, proxy.upstream.max_body, forward.post) {
            Ok(body) => body,
            Err(e) => return reject(request, e),
        };
        let mut session = match &route {
            Route::Own { client_id, stale: true, .. } if body.resendable() => {
                match reopen_session(proxy, incoming, credential, &lease, client_id) {
                    Ok(id) => Some(id),
                    Err(e) => return reject(request, e),
                }
            }
            Route::Own { upstream_id, .. } => Some(upstream_id.clone()),
            Route::Foreign | Route::Plain => None,
        };
        let own_session = match &route {
            Route::Own { client_id, .. } => Some(client_id.as_str()),
            Route::Foreign | Route::Plain => None,
        };
        let mut attempt = Attempt::default();
        let response = loop {
            let sent = send_upstream(
                &proxy.upstream,
                &mut request,
                &body,
                incoming,
                credential,
                lease.address,
                session.as_deref(),
            );
            match attempt.next(sent, own_session, &incoming.method, body.resendable()) {
                Next::Answer(response) => break response,
                // the container does not know this session (it slept, was replaced,
                // or this is another host): open one for the client, send again
                Next::Reopen(response, client_id) => {
                    match reopen_session(proxy, incoming, credential, &lease, client_id) {
                        Ok(id) => session = Some(id),
                        Err(_) => break response,
                    }
                }
                // the container moved or died since we last looked: look again (and
                // start it if need be), then try once more
                Next::Resend => {
                    proxy.containers.registry.mark_unknown(&lease.name);
                    match proxy.containers.acquire(want, false, &proxy.life.stopping) {
                        Ok(fresh) => lease = fresh,
                        Err(e) => return reject(request, e),
                    }
                }
                Next::Unreachable(e) => {
                    proxy.containers.registry.mark_unknown(&lease.name);
                    return reject(request, e);
                }
                Next::Refuse(e) => return reject(request, e),
            }
        };
        let status = response.status().as_u16();
        let client_session = note_session(proxy, incoming, &route, init_params, &lease, &response);
        let shown = match &client_session {
            _ if forward.stateless => Shown::NoSession,
            Some(id) if sessions::is_default(id) => Shown::NoSession,
            Some(id) => Shown::Client(id.as_str()),
            // never the container's own id
            None => Shown::NoSession,
        };
        let stamp = match (&route, forward.stateless) {
            (Route::Own { client_id, .. }, true) => Some(protocol::Stamp::new(server_info(proxy, client_id), &method)),
            _ => None,
        };
        let event_stream = is_event_stream(response.headers());
        let mut answer = Vec::new();
        let capture = edit.is_some().then_some(&mut answer);
        let answered = stream_response(
            proxy,
            request,
            incoming,
            response,
            socket.as_deref(),
            Delivery { shown, stamp: stamp.as_ref(), capture },
        );
        // noted even when the client went away: the container staged or saved all the same
        note_staged_edit(proxy, &lease, edit.as_ref(), &answer, event_stream);
        close_evicted(proxy, credential, &lease);
        answered.map_err(|e| (None, e))?;
        drop(lease);
        Ok(status)
    }

    /// Where one request stands in its sends: each way of sending it again is taken once.
    #[derive(Default)]
    struct Attempt {
        /// Sent again on a fresh lease, after the container never answered.
        resent: bool,
        /// Sent again on a session opened again, after the container did not know it.
        reopened: bool,
    }

    /// What a send came to: the step `proxy_http` takes next.
    enum Next<'r> {
        /// The answer, passed on to the client.
        Answer(ureq::http::Response<ureq::Body>),
        /// The container does not know the client's session (`client_id`): open it again
        /// and send again; this answer (a 404) is passed on if it cannot be opened.
        Reopen(ureq::http::Response<ureq::Body>, &'r str),
        /// The container never answered: look for it again (a fresh lease), send again.
        Resend,
        /// The container never answered, and the request is not sent again.
        Unreachable(ProxyError),
        /// The client's side failed, or the container took the request and failed it.
        Refuse(ProxyError),
    }

    impl Attempt {
        /// The step after a send: `own_session` is the client's session when it has its
        /// own, `resendable` whether the body can be sent again whole.
        fn next<'r>(
            &mut self,
            sent: Result<ureq::http::Response<ureq::Body>, Failure>,
            own_session: Option<&'r str>,
            method: &str,
            resendable: bool,
        ) -> Next<'r> {
            match sent {
                Ok(response) => {
                    let unknown_session = response.status().as_u16() == 404 && method != "DELETE";
                    match own_session {
                        Some(client_id) if unknown_session && resendable && !self.reopened => {
                            self.reopened = true;
                            Next::Reopen(response, client_id)
                        }
                        _ => Next::Answer(response),
                    }
                }
                Err(Failure::Client(e) | Failure::Failed(e)) => Next::Refuse(e),
                Err(Failure::NeverAnswered { resendable: unread, error }) => {
                    if (unread || resendable) && !self.resent {
                        self.resent = true;
                        Next::Resend
                    } else {
                        Next::Unreachable(error)
                    }
                }
            }
        }
    }

    /// The JSON-RPC messages of the container's answer (a JSON body, a batch, or SSE
    /// `data:` events): requests are parsed once, by `protocol`; answers here.
    fn json_rpc_messages(bytes: &[u8], event_stream: bool) -> Vec<Value> {
        let one_or_batch = |value: Value| match value {
            Value::Array(items) => items,
            other => vec![other],
        };
        if !event_stream {
            return serde_json::from_slice(bytes).map(one_or_batch).unwrap_or_default();
        }
        String::from_utf8_lossy(bytes)
            .lines()
            .filter_map(|line| line.strip_prefix("data:"))
            .filter_map(|data| serde_json::from_str(data.trim()).ok())
            .flat_map(one_or_batch)
            .collect()
    }

    /// The `edit_document` call in an MCP POST, from the protocol chapter's one parse.
    fn staged_edit_call(post: Option<&McpPost>) -> Option<crate::staged::EditCall> {
        post.and_then(|post| crate::staged::edit_call(&post.raw))
    }

    /// Tells the marks what the container answered to that call.
    fn note_staged_edit(
        proxy: &Proxy,
        lease: &Lease,
        edit: Option<&crate::staged::EditCall>,
        answer: &[u8],
        event_stream: bool,
    ) {
        let Some(call) = edit else { return };
        let staged = &proxy.containers.registry.staged;
        for message in json_rpc_messages(answer, event_stream) {
            staged.note_answer(&lease.name, lease.incarnation.as_deref(), call, &message);
        }
    }

    /// How an answer reaches the client: the session id it sees, the 2026-07-28 stamp,
    /// and where an edit's answer is kept aside for the staged-edit marks.
    struct Delivery<'a> {
        shown: Shown<'a>,
        stamp: Option<&'a protocol::Stamp>,
        capture: Option<&'a mut Vec<u8>>,
    }

    /// The Mcp-Session-Id the client sees in an answer.
    enum Shown<'a> {
        /// The client's own id, never the upstream one behind it.
        Client(&'a str),
        /// None: a client that sent no id gets none (default session, 2026-07-28).
        NoSession,
    }

    /// Writes the container's answer: its own length when it gave one, else chunked
    /// (close-delimited for HTTP/1.0); flushed after every read, so events are not held.
    fn stream_response(
        proxy: &Proxy,
        request: tiny_http::Request,
        incoming: &Incoming,
        response: ureq::http::Response<ureq::Body>,
        socket: Option<&TcpStream>,
        delivery: Delivery,
    ) -> Result<(), ProxyError> {
        let Delivery { shown, stamp, capture } = delivery;
        let status = response.status().as_u16();
        let mut headers = response_headers(response.headers());
        match shown {
            // the client sees its own session id, never the upstream one behind it
            Shown::Client(id) => {
                for (name, value) in headers.iter_mut() {
                    if name.eq_ignore_ascii_case(SESSION_HEADER) {
                        *value = id.to_string();
                    }
                }
            }
            Shown::NoSession => headers.retain(|(name, _)| !name.eq_ignore_ascii_case(SESSION_HEADER)),
        }
        let event_stream = is_event_stream(response.headers());
        if let (Some(stamp), false) = (stamp, event_stream) {
            return send_stamped_json(request, incoming, status, headers, response, stamp, capture);
        }
        let _long_lived = event_stream.then(|| InFlight::long_lived(&proxy.life));
        if event_stream {
            headers.retain(|(n, _)| !n.eq_ignore_ascii_case("x-accel-buffering"));
            headers.push(("X-Accel-Buffering".into(), "no".into()));
            if !headers.iter().any(|(n, _)| n.eq_ignore_ascii_case("cache-control")) {
                headers.push(("Cache-Control".into(), "no-cache".into()));
            }
        }
        let length = body_length(&response);
        let framing = wire::framing(&incoming.method, status, length, incoming.http10);
        if let (Framing::NoBody, Some(len)) = (framing, length) {
            // a HEAD (or 304) answer still tells the length of what it describes
            headers.push(("Content-Length".into(), len.to_string()));
        }
        let answer = wire::begin_answer(request, incoming, status, &headers, framing, false).map_err(client_gone)?;
        let (mut writer, close) = (answer.writer, answer.closes);
        match (framing, stamp) {
            (Framing::NoBody, _) => {}
            (framing, Some(stamp)) => copy_stamped_events(
                response.into_body().into_reader(),
                &mut writer,
                framing == Framing::Chunked,
                stamp,
                capture,
            )?,
            (framing, None) => copy_body(response.into_body().into_reader(), &mut writer, framing, socket, capture)?,
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

    /// Copies the container's body to the client, a flush after every read, in chunks
    /// when the `framing` is chunked, and into `capture` (up to CAPTURE_LIMIT) when given.
    /// A container that breaks off ends the client's answer unfinished, so the client
    /// knows, rather than as if it were complete. The buffer is no larger than a body of
    /// known length.
    fn copy_body(
        mut body: impl Read,
        writer: &mut dyn Write,
        framing: Framing,
        socket: Option<&TcpStream>,
        mut capture: Option<&mut Vec<u8>>,
    ) -> Result<(), ProxyError> {
        const MOST: u64 = 16 * 1024;
        let chunked = framing == Framing::Chunked;
        let size = match framing {
            Framing::Length(length) => length.clamp(1, MOST),
            _ => MOST,
        };
        let mut buf = vec![0u8; size as usize];
        loop {
            let n = match body.read(&mut buf) {
                Ok(0) => break,
                Ok(n) => n,
                Err(e) => {
                    log::warn!("container stream broke off: {}", e.kind());
                    if let Some(s) = socket {
                        let _ = s.shutdown(Shutdown::Both);
                    }
                    return Err(ProxyError::ContainerUnreachable("The container's answer broke off.".into()));
                }
            };
            if let Some(kept) = capture.as_deref_mut() {
                kept.extend_from_slice(&buf[..n.min(CAPTURE_LIMIT.saturating_sub(kept.len()))]);
            }
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
        Ok(())
    }
}

mod modern {
    //! Owns what the 2026-07-28 revision gets from the proxy itself: `server/discover`
    //! answered from the user's default session, `subscriptions/listen` held open, and
    //! results stamped with the server's identity (`_meta` serverInfo); the one parse of a
    //! POST and its checks stay in `protocol`. Calls `wire`, `error`, `auth` (the
    //! credential), `registry` (a lease), `protocol`, `sessions`, `reopen` (the default
    //! session), `held`, `upstream`.
    use crate::auth::Credential;
    use crate::error::ProxyError;
    use crate::held::{keep_open, EventFilter, HeldStream, Released};
    use crate::protocol::{self, McpPost};
    use crate::registry::Lease;
    use crate::reopen::open_default;
    use crate::sessions;
    use crate::upstream::{client_gone, write_chunk, CAPTURE_LIMIT};
    use crate::wire::{self, reject, Framing, Incoming, RouteResult};
    use crate::{InFlight, Proxy};
    use serde_json::{json, Value};
    use std::io::{self, Read, Write};
    use std::sync::Arc;

    /// The methods the proxy answers itself, from the user's default session.
    #[derive(Clone, Copy)]
    pub enum Method {
        Discover,
        Listen,
    }

    /// A 2026-07-28 request the proxy answers itself, from the `initialize` of the user's
    /// default session (opened first unless it is open in this container).
    pub fn answer(
        proxy: &Arc<Proxy>,
        request: tiny_http::Request,
        incoming: &Incoming,
        credential: &Credential,
        lease: Lease,
        post: &McpPost,
        method: Method,
    ) -> RouteResult {
        let initialized = match open_default(proxy, incoming, credential, &lease) {
            Ok(initialized) => initialized,
            Err(e) => return reject(request, e),
        };
        let owner = lease.name.clone();
        drop(lease);
        match method {
            Method::Discover => discover(request, incoming, post, &initialized),
            Method::Listen => listen(proxy, request, incoming, credential, &owner, post, &initialized),
        }
    }

    /// `server/discover`: the container's capabilities and identity, from the
    /// `initialize` of the user's default session, with every version the proxy speaks.
    fn discover(request: tiny_http::Request, incoming: &Incoming, post: &McpPost, initialized: &Value) -> RouteResult {
        let id = post.id.clone().unwrap_or(Value::Null);
        wire::send_json(request, incoming, 200, &protocol::discover_result(&id, initialized));
        Ok(200)
    }

    /// `subscriptions/listen`: a held SSE stream. Acknowledged with the filter the
    /// container can honour; then the change notifications the container sends on the
    /// user's default session, while it runs, and comment keep-alives. Like a held
    /// notification stream, it neither wakes nor keeps awake the container.
    fn listen(
        proxy: &Proxy,
        request: tiny_http::Request,
        incoming: &Incoming,
        credential: &Credential,
        owner: &str,
        post: &McpPost,
        initialized: &Value,
    ) -> RouteResult {
        let capabilities = initialized.get("capabilities").cloned().unwrap_or(Value::Null);
        let filter = protocol::listen_filter(post, &capabilities);
        let subscription = post.id.clone().unwrap_or(Value::Null);
        let headers = vec![
            ("Content-Type".to_string(), "text/event-stream".to_string()),
            ("Cache-Control".to_string(), "no-cache".to_string()),
            ("X-Accel-Buffering".to_string(), "no".to_string()),
        ];
        let acknowledged = json!({
            "jsonrpc": "2.0",
            "method": "notifications/subscriptions/acknowledged",
            "params": {"_meta": {protocol::SUBSCRIPTION_META: subscription}, "notifications": filter},
        });
        let mut writer = match wire::begin_answer(request, incoming, 200, &headers, Framing::Chunked, false) {
            Ok(answer) => answer.writer,
            Err(_) => return Ok(200),
        };
        if write_chunk(&mut writer, format!("data: {acknowledged}\n\n").as_bytes()).is_err() {
            return Ok(200);
        }
        let _long_lived = InFlight::long_lived(&proxy.life);
        let _held = HeldStream::count(proxy);
        let default_id = sessions::default_key(owner);
        let listening = Listening { filter: &filter, subscription: &subscription };
        // nothing agreed (mcp-outline announces no change notifications): keep-alives only
        let agreed = filter.as_object().is_some_and(|f| !f.is_empty());
        let session = agreed.then_some(default_id.as_str());
        if let Released::ClientGone =
            keep_open(proxy, incoming, credential, owner, session, &mut writer, Some(&listening))
        {
            return Ok(200);
        }
        // the proxy is stopping: the subscription ends gracefully
        let ended = json!({"jsonrpc": "2.0", "id": subscription,
            "result": {"resultType": "complete", "_meta": {protocol::SUBSCRIPTION_META: subscription}}});
        let _ = write_chunk(&mut writer, format!("data: {ended}\n\n").as_bytes())
            .and_then(|_| writer.write_all(b"0\r\n\r\n"))
            .and_then(|_| writer.flush());
        Ok(200)
    }

    /// A listen stream's filter and subscription id, applied to the container's events.
    struct Listening<'a> {
        filter: &'a Value,
        subscription: &'a Value,
    }

    impl EventFilter for Listening<'_> {
        /// The event to pass on for one of the container's `data:` lines, if wanted.
        fn pass(&self, data: &str) -> Option<String> {
            let mut message: Value = serde_json::from_str(data.trim()).ok()?;
            if !protocol::wanted(self.filter, &message) {
                return None;
            }
            let params = message.as_object_mut()?.entry("params").or_insert_with(|| json!({}));
            let meta = params.as_object_mut()?.entry("_meta").or_insert_with(|| json!({}));
            meta.as_object_mut()?.insert(protocol::SUBSCRIPTION_META.into(), self.subscription.clone());
            Some(format!("data: {message}\n\n"))
        }
    }

    /// The container's identity from its `initialize` result, for 2026-07-28 results.
    pub fn server_info(proxy: &Proxy, client_id: &str) -> Value {
        proxy.sessions.initialized(client_id).and_then(|r| r.get("serverInfo").cloned()).unwrap_or(Value::Null)
    }

    /// Largest JSON answer stamped for a 2026-07-28 client (read whole to be stamped).
    const STAMP_LIMIT: u64 = 64 << 20;

    /// A JSON answer to a 2026-07-28 request, its result stamped with the server's identity.
    pub fn send_stamped_json(
        request: tiny_http::Request,
        incoming: &Incoming,
        status: u16,
        headers: Vec<(String, String)>,
        response: ureq::http::Response<ureq::Body>,
        stamp: &protocol::Stamp,
        capture: Option<&mut Vec<u8>>,
    ) -> Result<(), ProxyError> {
        let broke = || ProxyError::ContainerUnreachable("The container's answer broke off.".into());
        let bytes = response.into_body().with_config().limit(STAMP_LIMIT).read_to_vec().map_err(|_| broke())?;
        if let Some(captured) = capture {
            captured.extend_from_slice(&bytes[..bytes.len().min(CAPTURE_LIMIT)]);
        }
        let body = protocol::stamp_result(&bytes, stamp).map(String::into_bytes).unwrap_or(bytes);
        wire::send_body(request, incoming, status, &headers, &body, incoming.wants_close).map_err(client_gone)
    }

    /// An SSE answer to a 2026-07-28 request, passed on event line by event line, the
    /// result's line stamped with the server's identity.
    pub fn copy_stamped_events(
        body: impl Read,
        writer: &mut dyn Write,
        chunked: bool,
        stamp: &protocol::Stamp,
        mut capture: Option<&mut Vec<u8>>,
    ) -> Result<(), ProxyError> {
        let mut lines = io::BufReader::new(body);
        let mut line = String::new();
        loop {
            line.clear();
            match io::BufRead::read_line(&mut lines, &mut line) {
                Ok(0) => break,
                Ok(_) => {}
                Err(_) => return Err(ProxyError::ContainerUnreachable("The container's answer broke off.".into())),
            }
            if let Some(kept) = capture.as_deref_mut() {
                let room = CAPTURE_LIMIT.saturating_sub(kept.len());
                kept.extend_from_slice(&line.as_bytes()[..line.len().min(room)]);
            }
            let stamped = line.strip_prefix("data:").and_then(|d| protocol::stamp_result(d.trim().as_bytes(), stamp));
            let out = match stamped {
                Some(message) => format!("data: {message}\n"),
                None => line.clone(),
            };
            let written = if chunked {
                write_chunk(writer, out.as_bytes())
            } else {
                writer.write_all(out.as_bytes()).and_then(|_| writer.flush())
            };
            written.map_err(client_gone)?;
        }
        if chunked {
            writer.write_all(b"0\r\n\r\n").map_err(client_gone)?;
        }
        Ok(())
    }
}

mod reopen {
    //! Owns the upstream MCP sessions the proxy itself opens and closes for its clients:
    //! what an answer says of a client's session, a session opened again (`initialize` with
    //! the client's own params) when its container slept or was replaced, the user's
    //! default session, and the sessions closed beyond the bound. Calls `wire`, `error`,
    //! `auth` (the key header), `registry` (a lease), `protocol` (versions, the MCP path),
    //! `sessions`, `upstream`.
    use crate::auth::{self, describe_ureq_error, Credential};
    use crate::error::ProxyError;
    use crate::protocol;
    use crate::registry::{Lease, State};
    use crate::sessions::{Reopen, Route, SESSION_HEADER};
    use crate::upstream::is_event_stream;
    use crate::wire::Incoming;
    use crate::Proxy;
    use serde_json::{json, Value};
    use std::net::SocketAddr;
    use std::time::Instant;

    /// A client's DELETE of its own session while its container sleeps (or is gone):
    /// the upstream session died with the container, so the proxy ends the client's
    /// session itself and wakes nothing (a desktop app quitting would otherwise boot a
    /// container to say goodbye). True when it did.
    pub fn end_while_asleep(proxy: &Proxy, incoming: &Incoming, name: &str) -> bool {
        let Some(client_id) = incoming.header(SESSION_HEADER).map(str::trim) else { return false };
        let asleep = matches!(proxy.containers.registry.state_of(name), State::Stopped | State::Missing);
        if incoming.method != "DELETE" || !asleep {
            return false;
        }
        if !matches!(proxy.sessions.route(Some(client_id), name, None), Route::Own { .. }) {
            return false;
        }
        proxy.sessions.ended(client_id, name);
        true
    }

    /// Records what an answer says of the client's session; returns the session id the
    /// client is to see in the answer's Mcp-Session-Id (its own, never the upstream's).
    pub fn note_session(
        proxy: &Proxy,
        incoming: &Incoming,
        route: &Route,
        init_params: Option<Value>,
        lease: &Lease,
        response: &ureq::http::Response<ureq::Body>,
    ) -> Option<String> {
        let ok = response.status().is_success();
        let incarnation = lease.incarnation.as_deref();
        match route {
            Route::Own { client_id, .. } => {
                if incoming.method == "DELETE" {
                    proxy.sessions.ended(client_id, &lease.name);
                } else if ok {
                    proxy.sessions.confirm(client_id, incarnation);
                }
                Some(client_id.clone())
            }
            Route::Plain => {
                // a new session: the client gets an id the proxy minted, never the container's
                let opened = response.headers().get(SESSION_HEADER).and_then(|v| v.to_str().ok()).filter(|_| ok)?;
                match proxy.sessions.opened(&lease.name, opened, incarnation, init_params) {
                    Ok(client_id) => Some(client_id),
                    Err(e) => {
                        log::error!("{}", e.message());
                        None
                    }
                }
            }
            Route::Foreign => None,
        }
    }

    /// Opens a new upstream session for a client session, or waits for the one another
    /// request is opening: `initialize` with the client's own recorded params (else its
    /// protocol version), then `notifications/initialized`.
    pub fn reopen_session(
        proxy: &Proxy,
        incoming: &Incoming,
        credential: &Credential,
        lease: &Lease,
        client_id: &str,
    ) -> Result<String, ProxyError> {
        let gone = || ProxyError::ContainerUnreachable("The session could not be opened again.".into());
        match proxy.sessions.reopen(client_id).ok_or_else(gone)? {
            Reopen::Follow(opening) => opening.wait(),
            Reopen::Lead(opening, params) => {
                let begun = Instant::now();
                match open_upstream_session(proxy, incoming, credential, lease, params) {
                    Ok((id, initialized)) => {
                        proxy.sessions.reopened(client_id, &opening, &id, lease.incarnation.as_deref(), initialized);
                        log::info!("session resurrected container={} {}ms", lease.name, begun.elapsed().as_millis());
                        Ok(id)
                    }
                    Err(e) => {
                        log::warn!("could not resurrect a session in {}: {}", lease.name, e.message());
                        proxy.sessions.reopen_failed(client_id, &opening, e.clone());
                        Err(e)
                    }
                }
            }
        }
    }

    /// The protocol version to offer when the client's own `initialize` is not known
    /// and its request names none.
    const FALLBACK_PROTOCOL_VERSION: &str = "2025-03-26";

    fn open_upstream_session(
        proxy: &Proxy,
        incoming: &Incoming,
        credential: &Credential,
        lease: &Lease,
        params: Option<Value>,
    ) -> Result<(String, Value), ProxyError> {
        let version = incoming
            .header("mcp-protocol-version")
            .map(str::trim)
            .filter(|v| protocol::HANDSHAKE_VERSIONS.contains(v))
            .unwrap_or(FALLBACK_PROTOCOL_VERSION);
        let params = params.unwrap_or_else(|| {
            json!({
                "protocolVersion": version,
                "capabilities": {},
                "clientInfo": {"name": "outline-mcp-proxy", "version": env!("CARGO_PKG_VERSION")},
            })
        });
        let initialize =
            json!({"jsonrpc": "2.0", "id": "outline-mcp-proxy-reopen", "method": "initialize", "params": params});
        let (session, answer) = mcp_call(proxy, incoming, credential, lease.address, None, None, &initialize)?;
        let failed =
            |why: &str| ProxyError::ContainerUnreachable(format!("The container refused a new session ({why})."));
        let session = session.ok_or_else(|| failed("no session id"))?;
        let result = answer.get("result").ok_or_else(|| failed("no result"))?;
        let negotiated = result.get("protocolVersion").and_then(Value::as_str).unwrap_or(version).to_string();
        let initialized = json!({"jsonrpc": "2.0", "method": "notifications/initialized"});
        let result = result.clone();
        mcp_call(proxy, incoming, credential, lease.address, Some(&session), Some(&negotiated), &initialized)?;
        Ok((session, result))
    }

    /// One JSON-RPC message the proxy sends for a client (a new session's handshake):
    /// the answer's session id and its JSON (from a JSON body or the first SSE event).
    fn mcp_call(
        proxy: &Proxy,
        incoming: &Incoming,
        credential: &Credential,
        address: SocketAddr,
        session: Option<&str>,
        version: Option<&str>,
        message: &Value,
    ) -> Result<(Option<String>, Value), ProxyError> {
        let url = format!("http://{address}{}", incoming.path);
        let mut builder = ureq::http::Request::post(&url)
            .header("Host", address.to_string())
            .header("Content-Type", "application/json")
            .header("Accept", "application/json, text/event-stream");
        if let Some(key) = proxy.upstream.forward_key(credential) {
            builder = builder.header(auth::KEY_HEADER, key);
        }
        if let Some(session) = session {
            builder = builder.header(SESSION_HEADER, session);
        }
        if let Some(version) = version {
            builder = builder.header("MCP-Protocol-Version", version);
        }
        let request = builder
            .body(message.to_string())
            .map_err(|_| ProxyError::BadRequest("The session handshake cannot be sent.".into()))?;
        let unreachable = |e: ureq::Error| {
            ProxyError::ContainerUnreachable(format!(
                "The container could not be reached ({}).",
                describe_ureq_error(&e)
            ))
        };
        let mut response = proxy.upstream.agent.run(request).map_err(unreachable)?;
        if !response.status().is_success() {
            return Err(ProxyError::ContainerUnreachable(format!(
                "The container answered {} to a session handshake.",
                response.status().as_u16()
            )));
        }
        let session = response.headers().get(SESSION_HEADER).and_then(|v| v.to_str().ok()).map(str::to_string);
        let event_stream = is_event_stream(response.headers());
        let text = response.body_mut().with_config().limit(1 << 20).read_to_string().unwrap_or_default();
        Ok((session, first_json(&text, event_stream)))
    }

    /// The JSON of a body, or of its first SSE `data:` line; Null when there is none.
    fn first_json(text: &str, event_stream: bool) -> Value {
        if !event_stream {
            return serde_json::from_str(text).unwrap_or(Value::Null);
        }
        text.lines()
            .filter_map(|line| line.strip_prefix("data:"))
            .find_map(|data| serde_json::from_str(data.trim()).ok())
            .unwrap_or(Value::Null)
    }

    /// Opens the user's default upstream session unless it is open in this container,
    /// and gives the container's `initialize` result.
    pub fn open_default(
        proxy: &Proxy,
        incoming: &Incoming,
        credential: &Credential,
        lease: &Lease,
    ) -> Result<Value, ProxyError> {
        let not_open = || ProxyError::ContainerUnreachable("The container's session could not be opened.".into());
        let Route::Own { client_id, stale, .. } =
            proxy.sessions.default_route(&lease.name, lease.incarnation.as_deref())
        else {
            return Err(not_open());
        };
        if stale || proxy.sessions.initialized(&client_id).is_none() {
            reopen_session(proxy, incoming, credential, lease, &client_id)?;
        }
        proxy.sessions.initialized(&client_id).ok_or_else(not_open)
    }

    /// Closes with DELETE the owner's upstream sessions forgotten beyond the bound, so a
    /// client that opens a session per call leaves nothing open in its container.
    pub fn close_evicted(proxy: &Proxy, credential: &Credential, lease: &Lease) {
        for upstream_id in proxy.sessions.take_evicted(&lease.name) {
            let url = format!("http://{}{}", lease.address, protocol::MCP_PATH);
            let mut builder = ureq::http::Request::delete(&url)
                .header("Host", lease.address.to_string())
                .header(SESSION_HEADER, upstream_id.as_str());
            if let Some(key) = proxy.upstream.forward_key(credential) {
                builder = builder.header(auth::KEY_HEADER, key);
            }
            let closed = builder.body(()).map_err(|_| "unsendable".to_string()).and_then(|request| {
                proxy.upstream.agent.run(request).map(|r| r.status().as_u16()).map_err(|e| describe_ureq_error(&e))
            });
            match closed {
                Ok(status) => {
                    log::info!("closed an upstream session over the bound container={} status={status}", lease.name)
                }
                Err(e) => log::warn!("could not close an upstream session in {}: {e}", lease.name),
            }
        }
    }
}

mod held {
    //! Owns the streams the proxy holds open for clients, so that they neither keep a
    //! container awake nor die with one: a client's GET notification stream, and the stream
    //! `modern` holds for a listen; attached to the container's own stream while it runs.
    //! Calls `wire`, `auth` (the credential), `registry` (a stream slot), `sessions`,
    //! `upstream`.
    use crate::auth::Credential;
    use crate::registry::StreamSlot;
    use crate::sessions::SESSION_HEADER;
    use crate::upstream::{is_event_stream, request_headers, write_chunk};
    use crate::wire::{self, header_tokens, Framing, Incoming, RouteResult};
    use crate::{InFlight, Proxy};
    use std::io::{self, Read, Write};
    use std::net::SocketAddr;
    use std::sync::Arc;
    use std::time::Instant;

    /// A client's standalone notification stream (GET, `Accept: text/event-stream`): the
    /// proxy holds it, so it neither keeps a container awake nor dies with one.
    pub fn is_notification_stream(incoming: &Incoming) -> bool {
        incoming.method == "GET"
            && incoming.header(SESSION_HEADER).is_some()
            && header_tokens(&incoming.headers, "accept").iter().any(|t| t.starts_with("text/event-stream"))
    }

    /// How one attachment to the container's stream ended.
    enum Attached {
        /// The container's stream ended (it slept, died, or closed it).
        Ended,
        /// The container would not give a stream for this session now.
        Refused,
        ClientGone,
    }

    /// Holds a client's notification stream (`keep_open`), ended properly when the proxy
    /// stops.
    pub fn hold_stream(
        proxy: &Arc<Proxy>,
        request: tiny_http::Request,
        incoming: &Incoming,
        credential: &Credential,
        owner: &str,
        client_id: &str,
        _slot: StreamSlot,
    ) -> RouteResult {
        let headers = vec![
            ("Content-Type".to_string(), "text/event-stream".to_string()),
            ("Cache-Control".to_string(), "no-cache".to_string()),
            ("X-Accel-Buffering".to_string(), "no".to_string()),
            ("Mcp-Session-Id".to_string(), client_id.to_string()),
        ];
        let Ok(mut writer) = wire::begin_answer(request, incoming, 200, &headers, Framing::Chunked, false)
            .and_then(|mut answer| answer.writer.flush().map(|_| answer.writer))
        else {
            return Ok(200);
        };
        let _long_lived = InFlight::long_lived(&proxy.life);
        let _held = HeldStream::count(proxy);
        if let Released::Stopping = keep_open(proxy, incoming, credential, owner, Some(client_id), &mut writer, None) {
            let _ = writer.write_all(b"0\r\n\r\n").and_then(|_| writer.flush());
        }
        Ok(200)
    }

    /// How a held stream was let go.
    pub enum Released {
        /// The proxy is stopping: the stream may be ended properly.
        Stopping,
        ClientGone,
    }

    /// Keeps a held stream open until the proxy stops or the client goes: attached to the
    /// container's own stream for the client's `session` while the container runs and
    /// knows it, else kept open with SSE comment keep-alives; it never wakes the
    /// container (a POST does), and attaches again when the container starts or the
    /// session is opened again. No `session`: keep-alives only. With a `filter`, the
    /// container's events are passed line by line as it picks them; else unchanged.
    pub fn keep_open(
        proxy: &Proxy,
        incoming: &Incoming,
        credential: &Credential,
        owner: &str,
        session: Option<&str>,
        writer: &mut dyn Write,
        filter: Option<&dyn EventFilter>,
    ) -> Released {
        let keepalive = proxy.cfg.sse_keepalive;
        let mut seen = proxy.sessions.generation();
        let mut last_write = Instant::now();
        while !proxy.life.stopping.load(std::sync::atomic::Ordering::SeqCst) {
            let attachable = session.and_then(|client_id| {
                let (address, incarnation) = proxy.containers.registry.peek_running(owner)?;
                let upstream_id = proxy.sessions.attachable(client_id, owner, incarnation.as_deref())?;
                Some((address, upstream_id))
            });
            if let Some(upstream) = attachable {
                let attached = attach(proxy, incoming, credential, &upstream, writer, &mut last_write, filter);
                if let Attached::ClientGone = attached {
                    return Released::ClientGone;
                }
            }
            seen = proxy.sessions.wait_change(seen, keepalive.saturating_sub(last_write.elapsed()));
            if last_write.elapsed() >= keepalive {
                if write_chunk(writer, b": keepalive\n\n").is_err() {
                    return Released::ClientGone;
                }
                last_write = Instant::now();
            }
        }
        Released::Stopping
    }

    /// Picks and rewrites the container's events for a held stream, from each `data:`
    /// line: the event to pass on, or None.
    pub trait EventFilter {
        fn pass(&self, data: &str) -> Option<String>;
    }

    /// Counts a held stream for /stats while alive.
    pub struct HeldStream<'a>(&'a std::sync::atomic::AtomicUsize);

    impl<'a> HeldStream<'a> {
        pub fn count(proxy: &'a Proxy) -> HeldStream<'a> {
            let held = &proxy.sessions.counters.held_streams;
            held.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
            HeldStream(held)
        }
    }

    impl Drop for HeldStream<'_> {
        fn drop(&mut self) {
            self.0.fetch_sub(1, std::sync::atomic::Ordering::Relaxed);
        }
    }

    /// Opens the container's notification stream for the session and passes its events
    /// on, until either side ends.
    fn attach(
        proxy: &Proxy,
        incoming: &Incoming,
        credential: &Credential,
        (address, upstream_id): &(SocketAddr, String),
        writer: &mut dyn Write,
        last_write: &mut Instant,
        filter: Option<&dyn EventFilter>,
    ) -> Attached {
        let (address, upstream_id) = (*address, upstream_id.as_str());
        let headers = request_headers(incoming, proxy.upstream.forward_key(credential), address, Some(upstream_id));
        let url = format!("http://{address}{}", incoming.target);
        let mut builder = ureq::http::Request::get(&url);
        for (name, value) in headers.iter().filter(|(n, _)| !n.eq_ignore_ascii_case("last-event-id")) {
            builder = builder.header(name.as_str(), value.as_str());
        }
        let Ok(request) = builder.body(()) else { return Attached::Refused };
        let response = match proxy.upstream.agent.run(request) {
            Ok(response) if response.status().as_u16() == 200 && is_event_stream(response.headers()) => response,
            _ => return Attached::Refused,
        };
        let mut body = response.into_body().into_reader();
        if let Some(filter) = filter {
            return pass_filtered(io::BufReader::new(body), writer, last_write, filter);
        }
        let mut buf = vec![0u8; 16 * 1024];
        loop {
            match body.read(&mut buf) {
                Ok(0) | Err(_) => return Attached::Ended,
                Ok(n) => {
                    if write_chunk(writer, &buf[..n]).is_err() {
                        return Attached::ClientGone;
                    }
                    *last_write = Instant::now();
                }
            }
        }
    }

    /// Passes on the container's events the filter picks, line by line.
    fn pass_filtered(
        mut body: impl io::BufRead,
        writer: &mut dyn Write,
        last_write: &mut Instant,
        filter: &dyn EventFilter,
    ) -> Attached {
        let mut line = String::new();
        loop {
            line.clear();
            match body.read_line(&mut line) {
                Ok(0) | Err(_) => return Attached::Ended,
                Ok(_) => {}
            }
            let Some(event) = line.strip_prefix("data:").and_then(|data| filter.pass(data)) else { continue };
            if write_chunk(writer, event.as_bytes()).is_err() {
                return Attached::ClientGone;
            }
            *last_write = Instant::now();
        }
    }
}

mod websocket {
    //! Owns WebSocket sessions: the handshake passed to the container (the client's path,
    //! subprotocols and key header), the container's answer deciding the client's, then
    //! frames relayed unchanged, one thread a direction. Calls `wire`, `error`, `auth` (the
    //! credential), `registry` (a lease), `upstream` (the request headers).
    use crate::auth::Credential;
    use crate::error::ProxyError;
    use crate::registry::Lease;
    use crate::upstream::request_headers;
    use crate::wire::{self, header_value, is_hop_by_hop, reject, Incoming, RouteResult};
    use crate::{InFlight, Proxy};
    use std::io::{self, BufReader, Read, Write};
    use std::net::{Shutdown, SocketAddr, TcpStream};
    use std::sync::Arc;
    use std::thread;
    use std::time::Duration;

    /// The container's side of a WebSocket handshake: the socket, a reader on it, and
    /// the status and headers it answered.
    struct UpstreamHandshake {
        stream: TcpStream,
        reader: BufReader<TcpStream>,
        status: u16,
        headers: Vec<(String, String)>,
    }

    /// Relays a WebSocket session: the handshake goes to the container with the
    /// client's path, subprotocols and key header; the container's answer decides the
    /// client's; then frames pass both ways unchanged, one thread a direction.
    pub fn relay_websocket(
        proxy: &Arc<Proxy>,
        request: tiny_http::Request,
        incoming: &Incoming,
        credential: &Credential,
        lease: &Lease,
    ) -> RouteResult {
        let Some(client_key) = incoming.header("sec-websocket-key").map(str::trim).map(str::to_string) else {
            return reject(request, ProxyError::BadRequest("A WebSocket upgrade needs Sec-WebSocket-Key.".into()));
        };
        // a handshake is a GET without a body (RFC 6455 4.1); one declared would be framed
        // by its length, not be the start of the session's frames
        if incoming.has_body() {
            return reject(request, ProxyError::BadRequest("A WebSocket upgrade must not have a body.".into()));
        }
        let upstream = match handshake_upstream(proxy, incoming, credential, lease) {
            Ok(upstream) => upstream,
            Err(e) => return reject(request, e),
        };
        if upstream.status != 101 {
            return refuse_upgrade(request, incoming, upstream);
        }
        let expected = tungstenite::handshake::derive_accept_key(client_key.as_bytes());
        if header_value(&upstream.headers, "sec-websocket-accept").map(str::trim) != Some(expected.as_str()) {
            let reason = "The container's WebSocket handshake was not valid.".to_string();
            return reject(request, ProxyError::ContainerUnreachable(reason));
        }
        let Some(client_socket) = request.socket() else {
            return reject(request, ProxyError::BadRequest("WebSockets need a TCP connection.".into()));
        };
        if let Ok((client_reader, client_writer)) = wire::accept_upgrade(request, &upstream.headers) {
            relay_session(proxy, &lease.name, &client_socket, client_reader, client_writer, upstream);
        }
        Ok(101)
    }

    /// Connects to the container, sends it the upgrade, and reads its answer's head.
    fn handshake_upstream(
        proxy: &Proxy,
        incoming: &Incoming,
        credential: &Credential,
        lease: &Lease,
    ) -> Result<UpstreamHandshake, ProxyError> {
        let stream = TcpStream::connect_timeout(&lease.address, Duration::from_secs(5)).map_err(|e| {
            proxy.containers.registry.mark_unknown(&lease.name);
            ProxyError::ContainerUnreachable(format!("The container could not be reached ({}).", e.kind()))
        })?;
        let _ = stream.set_nodelay(true);
        let mut reader = stream
            .try_clone()
            .map(BufReader::new)
            .map_err(|e| ProxyError::ContainerUnreachable(format!("socket: {e}")))?;
        let _ = stream.set_read_timeout(Some(proxy.cfg.response_timeout));
        let forward_key = proxy.upstream.forward_key(credential);
        let handshake = websocket_handshake(incoming, forward_key, lease.address);
        let (status, headers) = (&stream)
            .write_all(handshake.as_bytes())
            .and_then(|_| wire::read_response_head(&mut reader))
            .map_err(|e| {
                ProxyError::ContainerUnreachable(format!(
                    "The container broke off the WebSocket handshake ({}).",
                    e.kind()
                ))
            })?;
        Ok(UpstreamHandshake { stream, reader, status, headers })
    }

    /// A refused upgrade: the container's status (and a short body) to the client.
    fn refuse_upgrade(
        request: tiny_http::Request,
        incoming: &Incoming,
        mut upstream: UpstreamHandshake,
    ) -> RouteResult {
        let len = header_value(&upstream.headers, "content-length")
            .and_then(|v| v.trim().parse::<u64>().ok())
            .unwrap_or(0)
            .min(64 * 1024);
        let mut body = Vec::new();
        let _ = (&mut upstream.reader).take(len).read_to_end(&mut body);
        let kept: Vec<(String, String)> = upstream
            .headers
            .into_iter()
            .filter(|(n, _)| !is_hop_by_hop(n, &[]) && !n.eq_ignore_ascii_case("content-length"))
            .collect();
        let _ = wire::send_body(request, incoming, upstream.status, &kept, &body, true);
        Ok(upstream.status)
    }

    /// After 101: frames pass both ways, one thread a direction, until either side
    /// ends; then both sockets are shut, which wakes the other thread.
    fn relay_session(
        proxy: &Proxy,
        name: &str,
        client_socket: &TcpStream,
        client_reader: Box<dyn Read + Send>,
        client_writer: Box<dyn Write + Send>,
        upstream: UpstreamHandshake,
    ) {
        // from here on a session may idle for hours: no read timeouts, blocking reads
        let _ = client_socket.set_read_timeout(None);
        let _ = upstream.stream.set_read_timeout(None);
        log::info!("websocket session opened to {name}");
        let _long_lived = InFlight::long_lived(&proxy.life);
        let (Ok(client_for_thread), Ok(upstream_for_thread), Ok(upstream_writer)) =
            (client_socket.try_clone(), upstream.stream.try_clone(), upstream.stream.try_clone())
        else {
            end_session(client_socket, &upstream.stream);
            return;
        };
        let to_container = thread::Builder::new().name("ws-up".into()).spawn(move || {
            let result = relay_frames(client_reader, upstream_writer, true);
            end_session(&client_for_thread, &upstream_for_thread);
            result
        });
        let (up, down) = match to_container {
            Ok(handle) => {
                let down = relay_frames(upstream.reader, client_writer, false);
                end_session(client_socket, &upstream.stream);
                let up = handle.join().unwrap_or_else(|_| Err(io::Error::other("the relay thread panicked")));
                (up, down)
            }
            Err(e) => {
                log::warn!("no thread for the WebSocket session to {name} ({e}); ending it");
                end_session(client_socket, &upstream.stream);
                (Err(io::Error::other("no relay thread")), Ok(0))
            }
        };
        let count = |r: &io::Result<u64>| r.as_ref().map(|n| n.to_string()).unwrap_or_else(|e| e.to_string());
        log::info!("websocket session to {name} closed: {} frames up, {} down", count(&up), count(&down));
    }

    /// Shuts both sockets of a session, which wakes the relay thread blocked reading
    /// the other one: one side gone ends the whole session at once.
    fn end_session(client: &TcpStream, upstream: &TcpStream) {
        let _ = client.shutdown(Shutdown::Both);
        let _ = upstream.shutdown(Shutdown::Both);
    }

    /// The upgrade request for the container. The client's Sec-WebSocket-Key is passed
    /// on, so the container's Sec-WebSocket-Accept is valid for the client too.
    fn websocket_handshake(incoming: &Incoming, forward_key: Option<&str>, address: SocketAddr) -> String {
        let mut out = format!("GET {} HTTP/1.1\r\n", incoming.target);
        let mut headers = request_headers(incoming, forward_key, address, None);
        headers.push(("Connection".into(), "Upgrade".into()));
        headers.push(("Upgrade".into(), "websocket".into()));
        for (name, value) in headers {
            out.push_str(&format!("{name}: {value}\r\n"));
        }
        out.push_str("\r\n");
        out
    }

    /// Copies WebSocket frames from `reader` to `writer` unchanged, parsing each header
    /// with tungstenite to find its end; flushes after every frame. Client frames must
    /// be masked and container frames not (RFC 6455 §5.1). Returns the frame count.
    pub fn relay_frames(mut reader: impl Read, mut writer: impl Write, from_client: bool) -> io::Result<u64> {
        let mut frames = 0u64;
        let mut buf = vec![0u8; 16 * 1024];
        while let Some((head, payload_len)) = read_frame_header(&mut reader, from_client)? {
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
        Ok(frames)
    }

    /// One frame header, byte by byte (its raw bytes and the payload length), or None
    /// at a clean end between frames.
    fn read_frame_header(reader: &mut impl Read, from_client: bool) -> io::Result<Option<(Vec<u8>, u64)>> {
        use tungstenite::protocol::frame::FrameHeader;
        let mut head = Vec::with_capacity(14);
        loop {
            let mut byte = [0u8; 1];
            if reader.read(&mut byte)? == 0 {
                if head.is_empty() {
                    return Ok(None);
                }
                return Err(io::Error::new(io::ErrorKind::UnexpectedEof, "WebSocket frame header cut short"));
            }
            head.push(byte[0]);
            let mut cursor = io::Cursor::new(&head);
            match FrameHeader::parse(&mut cursor) {
                Ok(Some((header, payload_len))) => {
                    if header.mask.is_some() != from_client {
                        return Err(io::Error::new(
                            io::ErrorKind::InvalidData,
                            "WebSocket frame masking is wrong for its direction",
                        ));
                    }
                    return Ok(Some((head, payload_len)));
                }
                Ok(None) if head.len() < 14 => continue,
                _ => return Err(io::Error::new(io::ErrorKind::InvalidData, "malformed WebSocket frame")),
            }
        }
    }

    #[cfg(test)]
    mod tests {
        use super::*;

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
    }
}

mod upstream {
    //! Owns what passes between the proxy and a container over HTTP: the pooled client and
    //! its TCP connections (one probe, whole-second timeouts), the headers a container gets
    //! (only the checked key), the headers a client gets back, and the pieces of a body the
    //! relays share (event streams, chunks). Calls `wire`, `error`, `auth` (key headers),
    //! `config`, `sessions` (the session header), `util`, and libc's `recv` (the probe).
    use crate::auth::{self, Credential};
    use crate::config::{Config, KeyMode};
    use crate::error::ProxyError;
    use crate::sessions::SESSION_HEADER;
    use crate::util::agent_base;
    use crate::wire::{header_tokens, is_hop_by_hop, Incoming};
    use std::io::{self, Read, Write};
    use std::net::{SocketAddr, TcpStream};
    use std::sync::{Arc, Weak};
    use std::time::{Duration, Instant};
    use ureq::unversioned::transport::{Buffers, LazyBuffers, NextTimeout, ShutdownHandle};

    /// The pooled HTTP client to the containers, and what it must know of the settings.
    pub struct Upstream {
        pub agent: ureq::Agent,
        key_mode: KeyMode,
        pub max_body: u64,
        pub response_timeout: Duration,
    }

    impl Upstream {
        /// The client's headers as sent (no User-Agent, Accept or Accept-Encoding
        /// added), any method, no limit on a streamed body.
        pub fn new(cfg: &Config) -> Upstream {
            let agent = agent_base()
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
                // room for every client of a busy container at once (20 clients on
                // one container with 8 kept, and ureq's 10 in all, opened one new TCP
                // connection per 10 requests); each idle one holds its 48 KiB of buffers
                .max_idle_connections(64)
                .max_idle_connections_per_host(32)
                // below uvicorn's 5 s keep-alive, so a pooled connection is not one the
                // container is closing
                .max_idle_age(Duration::from_secs(4))
                .build();
            let agent = ureq::Agent::with_parts(agent, ContainerConnector, LiteralAddress);
            Upstream { agent, key_mode: cfg.key_mode, max_body: cfg.max_body, response_timeout: cfg.response_timeout }
        }

        /// The key the container gets with each request: in `header` mode only.
        pub fn forward_key<'a>(&self, credential: &'a Credential) -> Option<&'a str> {
            (self.key_mode == KeyMode::Header).then_some(credential.key.as_str())
        }
    }

    /// A container's URL holds its address (an IP and port, from Docker): read from it,
    /// never looked up (ureq's resolver writes it out and parses it again).
    #[derive(Debug)]
    struct LiteralAddress;

    impl ureq::unversioned::resolver::Resolver for LiteralAddress {
        fn resolve(
            &self,
            uri: &ureq::http::Uri,
            _config: &ureq::config::Config,
            _timeout: NextTimeout,
        ) -> Result<ureq::unversioned::resolver::ResolvedSocketAddrs, ureq::Error> {
            let address: SocketAddr =
                uri.authority().and_then(|a| a.as_str().parse().ok()).ok_or(ureq::Error::HostNotFound)?;
            let mut addresses = self.empty();
            addresses.push(address);
            Ok(addresses)
        }
    }

    /// Plain TCP to a container, as ureq's own connector makes it, with half the system
    /// calls of a warm request (12 to 6): a pooled connection is probed with one
    /// non-blocking peek (ureq's probe is three calls, and it probes twice per request),
    /// and a socket's timeouts are set only when their whole seconds change (ureq sets
    /// both again on every request, as their remainders shrink by microseconds). A
    /// timeout is so at most one second longer than asked.
    #[derive(Debug)]
    struct ContainerConnector;

    impl ureq::unversioned::transport::Connector for ContainerConnector {
        type Out = ContainerTransport;

        fn connect(
            &self,
            details: &ureq::unversioned::transport::ConnectionDetails,
            _chained: Option<()>,
        ) -> Result<Option<ContainerTransport>, ureq::Error> {
            let timeout = details.timeout.not_zero().map(|t| *t);
            let mut failure = ureq::Error::ConnectionFailed;
            for address in details.addrs.iter() {
                let connected = match timeout {
                    Some(t) => TcpStream::connect_timeout(address, t),
                    None => TcpStream::connect(address),
                };
                match connected {
                    Ok(stream) => {
                        stream.set_nodelay(true)?;
                        let stream = Arc::new(stream);
                        (details.register_shutdown)(Arc::downgrade(&stream) as Weak<dyn ShutdownHandle>)?;
                        let config = details.config;
                        let buffers = LazyBuffers::new(config.input_buffer_size(), config.output_buffer_size());
                        return Ok(Some(ContainerTransport {
                            stream,
                            buffers,
                            read_timeout: None,
                            write_timeout: None,
                        }));
                    }
                    Err(e) if e.kind() == io::ErrorKind::TimedOut => {
                        failure = ureq::Error::Timeout(details.timeout.reason)
                    }
                    Err(e) => failure = ureq::Error::Io(e),
                }
            }
            Err(failure)
        }
    }

    /// One connection to a container, with the timeouts its socket holds now.
    #[derive(Debug)]
    struct ContainerTransport {
        stream: Arc<TcpStream>,
        buffers: LazyBuffers,
        read_timeout: Option<Duration>,
        write_timeout: Option<Duration>,
    }

    impl ureq::unversioned::transport::Transport for ContainerTransport {
        fn buffers(&mut self) -> &mut dyn Buffers {
            &mut self.buffers
        }

        fn transmit_output(&mut self, amount: usize, timeout: NextTimeout) -> Result<(), ureq::Error> {
            let timeout = timeout.for_write();
            let wanted = whole_seconds(timeout).ok_or(ureq::Error::Timeout(timeout.reason))?;
            if wanted != self.write_timeout {
                self.stream.set_write_timeout(wanted)?;
                self.write_timeout = wanted;
            }
            let output = &self.buffers.output()[..amount];
            (&*self.stream).write_all(output).map_err(|e| timed_out_as(e, timeout.reason))
        }

        fn await_input(&mut self, timeout: NextTimeout) -> Result<bool, ureq::Error> {
            let timeout = timeout.for_read();
            let wanted = whole_seconds(timeout).ok_or(ureq::Error::Timeout(timeout.reason))?;
            if wanted != self.read_timeout {
                self.stream.set_read_timeout(wanted)?;
                self.read_timeout = wanted;
            }
            let started = Instant::now();
            let amount = loop {
                match (&*self.stream).read(self.buffers.input_append_buf()) {
                    // a signal: read again while the time allows (it is not counted again)
                    Err(e) if e.kind() == io::ErrorKind::Interrupted => {
                        if wanted.is_some_and(|t| started.elapsed() >= t) {
                            return Err(ureq::Error::Timeout(timeout.reason));
                        }
                    }
                    result => break result.map_err(|e| timed_out_as(e, timeout.reason))?,
                }
            };
            self.buffers.input_appended(amount);
            Ok(amount > 0)
        }

        fn is_open(&mut self) -> bool {
            is_open_and_quiet(&self.stream)
        }
    }

    /// A timeout as the socket is to hold it: rounded up to whole seconds (None: none at
    /// all); None when it has already passed.
    fn whole_seconds(timeout: NextTimeout) -> Option<Option<Duration>> {
        if timeout.after.is_not_happening() {
            return Some(None);
        }
        let left = *timeout.after;
        if left.is_zero() {
            return None;
        }
        Some(Some(Duration::from_secs(seconds_rounded_up(left))))
    }

    /// The whole seconds a container's socket waits for `timeout` (see `ContainerConnector`).
    pub fn seconds_rounded_up(timeout: Duration) -> u64 {
        timeout.as_secs() + u64::from(timeout.subsec_nanos() > 0)
    }

    /// A socket's timeout (WouldBlock or TimedOut from a read or write) as ureq's timeout
    /// of that name; any other error as it is.
    fn timed_out_as(e: io::Error, reason: ureq::Timeout) -> ureq::Error {
        match e.kind() {
            io::ErrorKind::WouldBlock | io::ErrorKind::TimedOut => ureq::Error::Timeout(reason),
            _ => ureq::Error::Io(e),
        }
    }

    /// Whether a pooled connection is open with nothing unread on it (bytes there mean an
    /// answer was not read to its end, or the container sent what was not asked): one
    /// `recv(MSG_PEEK | MSG_DONTWAIT)`.
    fn is_open_and_quiet(stream: &TcpStream) -> bool {
        use std::os::fd::AsRawFd;
        use std::os::raw::{c_int, c_void};
        extern "C" {
            fn recv(fd: c_int, buf: *mut c_void, len: usize, flags: c_int) -> isize;
        }
        // Linux's values (the proxy runs on Linux only: cgroups, sysinfo)
        const MSG_PEEK: c_int = 0x2;
        const MSG_DONTWAIT: c_int = 0x40;
        let mut byte = 0u8;
        // SAFETY: the descriptor is the stream's, open while the stream is borrowed; the
        // buffer is one byte of ours, and recv writes at most the length it is given.
        let read = unsafe { recv(stream.as_raw_fd(), (&mut byte as *mut u8).cast(), 1, MSG_PEEK | MSG_DONTWAIT) };
        read < 0 && io::Error::last_os_error().kind() == io::ErrorKind::WouldBlock
    }

    /// The headers the container gets: the client's, less hop-by-hop ones, the
    /// credential headers, Host and Expect; plus X-Forwarded-*, and the key when given.
    pub fn request_headers(
        incoming: &Incoming,
        forward_key: Option<&str>,
        address: SocketAddr,
        session: Option<&str>,
    ) -> Vec<(String, String)> {
        let connection = header_tokens(&incoming.headers, "connection");
        let mut out: Vec<(String, String)> = Vec::with_capacity(incoming.headers.len() + 5);
        if let (Some(upstream), None) = (session, incoming.header(SESSION_HEADER)) {
            // the default session, for a client that sent no id
            out.push(("Mcp-Session-Id".into(), upstream.to_string()));
        }
        for (name, value) in &incoming.headers {
            let is = |other: &str| name.eq_ignore_ascii_case(other);
            let dropped = is_hop_by_hop(name, &connection)
                || ["host", "expect", "x-forwarded-for", "content-length"].into_iter().any(is)
                || auth::is_credential_header(name);
            if dropped {
                continue;
            }
            match session {
                // the upstream session that stands for the client's
                Some(upstream) if is(SESSION_HEADER) => out.push((name.clone(), upstream.to_string())),
                _ => out.push((name.clone(), value.clone())),
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
        if let Some(key) = forward_key {
            out.push((auth::KEY_HEADER.into(), key.to_string()));
        }
        out
    }

    /// The headers the client gets back: the container's, less hop-by-hop ones and the
    /// framing (which the proxy writes itself).
    pub fn response_headers(headers: &ureq::http::HeaderMap) -> Vec<(String, String)> {
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

    /// How long the container's body is, as it is read (a `Transfer-Encoding` beside a
    /// `Content-Length` wins, as RFC 9112 §6.3 has it, and ureq reads the body so): the
    /// length the client is told. An answer without a body (HEAD, 204, 304) tells the
    /// length of what it describes when it is not chunked.
    pub fn body_length(response: &ureq::http::Response<ureq::Body>) -> Option<u64> {
        if let Some(length) = response.body().content_length() {
            return Some(length);
        }
        let headers = response.headers();
        if headers.contains_key("transfer-encoding") {
            return None;
        }
        headers.get("content-length").and_then(|v| v.to_str().ok()).and_then(|v| v.trim().parse::<u64>().ok())
    }

    pub fn is_event_stream(headers: &ureq::http::HeaderMap) -> bool {
        headers
            .get("content-type")
            .and_then(|v| v.to_str().ok())
            .is_some_and(|v| v.to_ascii_lowercase().starts_with("text/event-stream"))
    }

    pub fn write_chunk(writer: &mut dyn Write, bytes: &[u8]) -> io::Result<()> {
        write!(writer, "{:x}\r\n", bytes.len())
            .and_then(|_| writer.write_all(bytes))
            .and_then(|_| writer.write_all(b"\r\n"))
            .and_then(|_| writer.flush())
    }

    pub fn client_gone(_: io::Error) -> ProxyError {
        ProxyError::BadRequest("The client went away.".into())
    }

    /// Largest answer kept aside for the staged-edit marks (mcp-outline's answer to an
    /// edit is a sentence).
    pub const CAPTURE_LIMIT: usize = 1 << 20;

    #[cfg(test)]
    mod tests {
        use super::*;
        use crate::tests::incoming;
        use crate::wire::header_value;
        use std::net::SocketAddr;

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
            let out = request_headers(&inc, Some("client-key"), addr, None);
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
            // env mode: the container holds the key, requests do not carry it
            let env_mode = request_headers(&inc, None, addr, None);
            assert!(header_value(&env_mode, "x-outline-api-key").is_none());
            // a key sent as Bearer is not passed on as Authorization; nor is a second key
            // beside X-Outline-API-Key: only the checked key reaches the container
            let bearer = incoming(&[("Authorization", "Bearer k")]);
            assert!(header_value(&request_headers(&bearer, None, addr, None), "authorization").is_none());
            let both = incoming(&[("X-Outline-API-Key", "checked"), ("Authorization", "Bearer another")]);
            let out = request_headers(&both, Some("checked"), addr, None);
            assert!(header_value(&out, "authorization").is_none());
            assert_eq!(header_value(&out, "x-outline-api-key"), Some("checked"));
        }

        #[test]
        fn a_pooled_connection_is_open_only_while_quiet() {
            use std::net::TcpListener;
            let listener = TcpListener::bind("127.0.0.1:0").unwrap();
            let ours = TcpStream::connect(listener.local_addr().unwrap()).unwrap();
            let (mut theirs, _) = listener.accept().unwrap();
            // what the peer sent or did reaches our side of the socket soon, not at once
            let settled = |stream: &TcpStream| {
                let until = Instant::now() + Duration::from_secs(5);
                while is_open_and_quiet(stream) && Instant::now() < until {
                    std::thread::yield_now();
                }
                is_open_and_quiet(stream)
            };
            assert!(is_open_and_quiet(&ours), "an idle connection");
            // bytes nobody asked for: not to be reused (and the peek leaves them there)
            theirs.write_all(b"x").unwrap();
            assert!(!settled(&ours), "unread bytes");
            let mut byte = [0u8; 1];
            (&ours).read_exact(&mut byte).unwrap();
            assert_eq!(&byte, b"x");
            assert!(is_open_and_quiet(&ours), "read: quiet again");
            drop(theirs);
            assert!(!settled(&ours), "closed by the container");
        }

        #[test]
        fn socket_timeouts_are_whole_seconds_rounded_up() {
            use ureq::unversioned::transport::time::Duration as Remaining;
            let next = |after: Remaining| NextTimeout {
                after,
                reason: ureq::Timeout::Global,
                per_read: None,
                per_write: None,
            };
            let millis = |ms: u64| Remaining::Exact(Duration::from_millis(ms));
            assert_eq!(whole_seconds(next(millis(29_999))), Some(Some(Duration::from_secs(30))));
            assert_eq!(whole_seconds(next(millis(30_000))), Some(Some(Duration::from_secs(30))));
            assert_eq!(whole_seconds(next(millis(1))), Some(Some(Duration::from_secs(1))));
            assert_eq!(whole_seconds(next(Remaining::NotHappening)), Some(None));
            assert_eq!(whole_seconds(next(millis(0))), None, "already passed");
        }

        #[test]
        fn response_headers_lose_hop_by_hop_and_framing() {
            let mut map = ureq::http::HeaderMap::new();
            map.insert("connection", "close, x-secret".parse().unwrap());
            map.insert("x-secret", "1".parse().unwrap());
            map.insert("transfer-encoding", "chunked".parse().unwrap());
            map.insert("content-length", "5".parse().unwrap());
            map.insert("mcp-session-id", "s1".parse().unwrap());
            let out = response_headers(&map);
            assert_eq!(out, vec![("mcp-session-id".to_string(), "s1".to_string())]);
        }
    }
}

mod ops {
    //! Owns what the operator sees: /health (from memory), /stats and /metrics (the
    //! same figures as JSON and Prometheus text), and the `check` and `cleanup`
    //! commands. Calls `registry` (figures), `staged` (holds), `docker` (verbs), `auth`
    //! (Outline), `memory` (the budget and its cgroup).
    use crate::auth::identify;
    use crate::auth::{self, Verifier};
    use crate::config::{Config, KeyMode};
    use crate::docker::{first_line, Docker, Role};
    use crate::error::ProxyError;
    use crate::memory::Parent;
    use crate::registry::{due_for_removal, ContainerSnapshot};
    use crate::util::{base64_encode, constant_time_eq, format_rfc3339};
    use crate::wire::{self, Incoming};
    use crate::wire::{reject, LogContext, RouteResult};
    use crate::Proxy;
    use serde_json::{json, Value};
    use std::net::TcpStream;
    use std::process::ExitCode;
    use std::sync::atomic::Ordering;
    use std::sync::Arc;
    use std::time::Duration;

    /// `Basic …` for /stats and /metrics, when a password is set.
    pub fn stats_credentials(cfg: &Config) -> Option<String> {
        cfg.stats_password
            .as_ref()
            .map(|p| format!("Basic {}", base64_encode(format!("{}:{}", cfg.stats_user, p).as_bytes())))
    }

    pub fn health_endpoint(
        proxy: &Arc<Proxy>,
        request: tiny_http::Request,
        incoming: &Incoming,
        log_ctx: &mut LogContext,
    ) -> RouteResult {
        let (tracked, running) = proxy.containers.registry.counts();
        let docker = proxy.containers.docker_status();
        let mut body = json!({
            "status": if docker.is_answering() { "healthy" } else { "unhealthy" },
            "containers_tracked": tracked,
            "containers_running": running,
            "docker": if docker.is_answering() { "ok" } else { "unreachable" },
        });
        if let Some(reason) = docker.reason() {
            body["reason"] = json!(reason);
        }
        if auth::presents_credential(incoming) {
            let (_, verified, name) = match identify(proxy, incoming, log_ctx) {
                Ok(who) => who,
                Err(e) => return reject(request, e),
            };
            let user = &verified.user;
            let state = proxy.containers.registry.state_of(&name);
            body["user"] = json!({"id": user.id, "name": user.name, "email": user.email});
            body["container"] = json!({"name": name, "state": state.as_str()});
        }
        let status = if docker.is_answering() { 200 } else { 503 };
        wire::send_json(request, incoming, status, &body);
        Ok(status)
    }

    pub fn stats_endpoint(
        proxy: &Arc<Proxy>,
        request: tiny_http::Request,
        incoming: &Incoming,
        prometheus: bool,
    ) -> RouteResult {
        if let Some(expected) = &proxy.stats_credentials {
            let given = incoming.header("authorization").unwrap_or("").trim();
            if !constant_time_eq(given.as_bytes(), expected.as_bytes()) {
                return reject(request, ProxyError::OperatorOnly);
            }
        }
        let snapshot = snapshot(proxy);
        if prometheus {
            let headers = vec![("Content-Type".to_string(), "text/plain; version=0.0.4".to_string())];
            let _ = wire::send_body(request, incoming, 200, &headers, render_metrics(&snapshot).as_bytes(), false);
        } else {
            wire::send_json(request, incoming, 200, &render_stats(&snapshot));
        }
        Ok(200)
    }

    pub struct Snapshot {
        pub containers: Vec<ContainerSnapshot>,
        auth_hits: u64,
        auth_misses: u64,
        auth_failures: u64,
        outline_calls: u64,
        held_streams: usize,
        resurrections: u64,
        /// OAuth grants and registered clients (0 and 0 with the front door off).
        oauth_grants: usize,
        oauth_clients: usize,
        uptime: u64,
        docker_ok: bool,
        /// MCP calls per method, and `tools/call` per tool.
        calls_by_method: Vec<(String, u64)>,
        calls_by_tool: Vec<(String, u64)>,
        memory: MemoryFigures,
    }

    /// The memory budget (0 = none), what the containers use, how many fit, and how many
    /// were put to sleep to make room under it.
    pub struct MemoryFigures {
        budget: u64,
        /// The kernel's limit on the containers' parent (0: none): the budget, when held.
        kernel_limit: u64,
        in_use: u64,
        fit: usize,
        sleeps: u64,
    }

    pub fn snapshot(proxy: &Proxy) -> Snapshot {
        let counters = &proxy.auth.counters;
        let budget = &proxy.containers.budget;
        let mut containers = proxy.containers.registry.snapshot();
        let sessions = proxy.sessions.per_owner();
        for c in containers.iter_mut() {
            c.sessions = sessions.get(&c.name).copied().unwrap_or(0);
            if let Some(holding) = proxy.containers.registry.staged.holding(&c.name) {
                c.staged_documents = holding.documents.len();
                c.staged_seconds = holding.held_seconds();
            }
        }
        Snapshot {
            containers,
            held_streams: proxy.sessions.counters.held_streams.load(Ordering::Relaxed),
            resurrections: proxy.sessions.counters.resurrections.load(Ordering::Relaxed),
            auth_hits: counters.hits.load(Ordering::Relaxed),
            auth_misses: counters.misses.load(Ordering::Relaxed),
            auth_failures: counters.failures.load(Ordering::Relaxed),
            outline_calls: counters.outline_calls.load(Ordering::Relaxed),
            oauth_grants: proxy.oauth.as_ref().map_or(0, |door| door.grants.grant_count()),
            oauth_clients: proxy.oauth.as_ref().map_or(0, |door| door.grants.client_count()),
            uptime: proxy.life.started.elapsed().as_secs(),
            docker_ok: proxy.containers.docker_status().is_answering(),
            calls_by_method: proxy.calls.methods(),
            calls_by_tool: proxy.calls.tools(),
            memory: MemoryFigures {
                budget: budget.bytes,
                kernel_limit: budget.kernel_limit(),
                in_use: budget.in_use(),
                fit: budget.containers_fit(),
                sleeps: budget.sleeps.load(Ordering::Relaxed),
            },
        }
    }

    pub fn render_stats(s: &Snapshot) -> Value {
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
                    "sessions": c.sessions,
                    "spare": c.role == Role::Spare,
                    "staged_documents": c.staged_documents,
                    "staged_seconds": c.staged_seconds,
                })
            })
            .collect();
        json!({
            "total_containers": s.containers.len(),
            "running_count": s.containers.iter().filter(|c| c.state.is_running()).count(),
            "spares_ready": s.containers.iter().filter(|c| c.role == Role::Spare && c.state.is_running()).count(),
            "holding_staged_edits": s.containers.iter().filter(|c| c.staged_documents > 0).count(),
            "containers": containers,
            "auth": {"hits": s.auth_hits, "misses": s.auth_misses, "failures": s.auth_failures, "outline_calls": s.outline_calls},
            "sessions": {"held_streams": s.held_streams, "resurrections": s.resurrections},
            "oauth": {"grants": s.oauth_grants, "registered_clients": s.oauth_clients},
            "docker": if s.docker_ok { "ok" } else { "unreachable" },
            "uptime_seconds": s.uptime,
            "memory": {
                "budget_bytes": s.memory.budget,
                "kernel_limit_bytes": if s.memory.kernel_limit > 0 { json!(s.memory.kernel_limit) } else { Value::Null },
                "in_use_bytes": s.memory.in_use,
                "containers_fit": if s.memory.budget > 0 { json!(s.memory.fit) } else { Value::Null },
                "budget_sleeps": s.memory.sleeps,
            },
        })
    }

    pub fn render_metrics(s: &Snapshot) -> String {
        let running = s.containers.iter().filter(|c| c.state.is_running()).count();
        let spares = s.containers.iter().filter(|c| c.role == Role::Spare && c.state.is_running()).count();
        let holding = s.containers.iter().filter(|c| c.staged_documents > 0).count();
        let totals: [(&str, &str, &str, String); 18] = [
            ("mcp_proxy_spares_ready", "gauge", "Warm spares booted and unassigned.", spares.to_string()),
            (
                "mcp_proxy_containers_holding_staged_edits",
                "gauge",
                "Containers kept awake because they hold unsaved staged edits.",
                holding.to_string(),
            ),
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
            (
                "mcp_proxy_outline_calls_total",
                "counter",
                "Calls made to Outline's auth.info.",
                s.outline_calls.to_string(),
            ),
            (
                "mcp_proxy_held_streams",
                "gauge",
                "Clients' notification streams the proxy holds open.",
                s.held_streams.to_string(),
            ),
            (
                "mcp_proxy_session_resurrections_total",
                "counter",
                "Upstream sessions opened again for a client's session.",
                s.resurrections.to_string(),
            ),
            ("mcp_proxy_oauth_grants", "gauge", "OAuth sign-ins granted and alive.", s.oauth_grants.to_string()),
            (
                "mcp_proxy_oauth_registered_clients",
                "gauge",
                "OAuth clients registered (RFC 7591).",
                s.oauth_clients.to_string(),
            ),
            ("mcp_proxy_uptime_seconds", "gauge", "Seconds since the proxy started.", s.uptime.to_string()),
            (
                "mcp_proxy_memory_budget_bytes",
                "gauge",
                "Memory all user containers may use together (0 = no budget).",
                s.memory.budget.to_string(),
            ),
            (
                "mcp_proxy_memory_kernel_limit_bytes",
                "gauge",
                "The kernel's limit on the containers' parent cgroup (0 = none): the budget when it is held.",
                s.memory.kernel_limit.to_string(),
            ),
            (
                "mcp_proxy_memory_in_use_bytes",
                "gauge",
                "Memory the containers' parent cgroup uses (less inactive file cache).",
                s.memory.in_use.to_string(),
            ),
            (
                "mcp_proxy_budget_sleeps_total",
                "counter",
                "Idle containers put to sleep to make room under the memory budget.",
                s.memory.sleeps.to_string(),
            ),
        ];
        type PerContainer = fn(&ContainerSnapshot) -> String;
        let per_container: [(&str, &str, &str, PerContainer); 8] = [
            ("mcp_proxy_container_up", "gauge", "1 when the container is running.", |c| {
                u8::from(c.state.is_running()).to_string()
            }),
            ("mcp_proxy_container_active_requests", "gauge", "Requests and streams in flight.", |c| {
                c.active.to_string()
            }),
            ("mcp_proxy_container_websockets", "gauge", "Open WebSocket sessions.", |c| c.websockets.to_string()),
            ("mcp_proxy_container_requests_total", "counter", "Requests routed to the container.", |c| {
                c.requests_total.to_string()
            }),
            ("mcp_proxy_container_idle_seconds", "gauge", "Seconds since the last request ended.", |c| {
                c.idle_seconds.to_string()
            }),
            ("mcp_proxy_container_sessions", "gauge", "Client MCP sessions bound to the container.", |c| {
                c.sessions.to_string()
            }),
            ("mcp_proxy_container_staged_documents", "gauge", "Documents with unsaved staged edits it holds.", |c| {
                c.staged_documents.to_string()
            }),
            ("mcp_proxy_container_staged_seconds", "gauge", "Seconds it has held staged edits (0 = none).", |c| {
                c.staged_seconds.to_string()
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
        type PerCall<'a> = (&'a str, &'a str, &'a str, &'a Vec<(String, u64)>);
        let per_call: [PerCall; 2] = [
            ("mcp_proxy_mcp_calls_total", "method", "MCP requests by JSON-RPC method.", &s.calls_by_method),
            ("mcp_proxy_mcp_tool_calls_total", "tool", "MCP tools/call requests by tool.", &s.calls_by_tool),
        ];
        for (name, label, help, counts) in per_call {
            out.push_str(&format!("# HELP {name} {help}\n# TYPE {name} counter\n"));
            for (value, count) in counts {
                out.push_str(&format!("{name}{{{label}=\"{}\"}} {count}\n", label_value(value)));
            }
        }
        out
    }

    /// A label value in the exposition format: backslash, quote and newline escaped
    /// (the names come from clients).
    fn label_value(value: &str) -> String {
        let short: String = value.chars().take(100).collect();
        short.replace('\\', "\\\\").replace('"', "\\\"").replace('\n', "\\n")
    }

    /// `check`: each line a check, exit 1 when any fails.
    pub fn run_check(cfg: &Config) -> ExitCode {
        let mut ok = true;
        let mut report = |passed: bool, what: String| {
            println!("{} {what}", if passed { "✓" } else { "✗" });
            ok &= passed;
        };
        report(true, format!("settings are valid (listen {}, key mode {:?})", cfg.listen, cfg.key_mode));
        if cfg.key_mode == KeyMode::Env {
            println!(
                "! key mode env: each container holds its user's key, and mcp-outline uses it for a request \
                 without one, so any process on this host that can reach the container acts as that user; \
                 Docker also keeps the key in its container config on disk. Prefer header mode (mcp-outline >= 1.6)."
            );
        }
        let docker = Docker::new(&cfg.docker);
        let version = docker.server_version();
        match &version {
            Ok(v) => report(true, format!("Docker daemon answers (version {v})")),
            Err(e) => report(false, format!("Docker daemon does not answer: {}", first_line(&e.message()))),
        }
        if version.is_ok() {
            match docker.image_present(&cfg.image) {
                Ok(()) => report(true, format!("image {} is present", cfg.image)),
                Err(_) => report(false, format!("image {} is missing: docker pull {}", cfg.image, cfg.image)),
            }
            match docker.network_icc(&cfg.network) {
                Ok(Some(false)) => report(
                    true,
                    format!("docker network {} keeps containers apart (inter-container traffic off)", cfg.network),
                ),
                Ok(Some(true)) => report(
                    false,
                    format!(
                        "docker network {} lets containers reach each other: set MCP_PROXY_NETWORK to a network \
                         the proxy makes itself (it creates a missing one with enable_icc=false)",
                        cfg.network
                    ),
                ),
                Ok(None) => report(
                    true,
                    format!("docker network {} will be created at start-up, inter-container traffic off", cfg.network),
                ),
                Err(e) => report(
                    false,
                    format!("cannot inspect docker network {}: {}", cfg.network, first_line(&e.message())),
                ),
            }
            match docker.list_managed(&cfg.network, &cfg.prefix) {
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
            check_budget(cfg, &docker, &mut report);
        }
        if version.is_ok() && matches!(docker.network_icc(&cfg.network), Ok(Some(_))) {
            check_outline_from_a_container(cfg, &docker, &mut report);
        }
        check_installed_host(&mut report);
        check_oauth(cfg, &mut report);
        match Verifier::new(cfg).ask_outline("outline-mcp-proxy-check") {
            Err(ProxyError::Unauthorized(_)) => {
                report(true, format!("Outline answers at {}/api/auth.info", cfg.outline_url))
            }
            Ok(_) => report(false, "Outline accepted a made-up key: is OUTLINE_URL really Outline?".into()),
            Err(e) => {
                report(false, format!("Outline at {} does not answer as expected: {}", cfg.outline_url, e.message()))
            }
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

    /// The containers' parent cgroup: does the kernel hold it to MCP_PROXY_MEMORY_BUDGET?
    fn check_budget(cfg: &Config, docker: &Docker, report: &mut dyn FnMut(bool, String)) {
        if cfg.memory_budget == 0 {
            println!("- no memory budget (MCP_PROXY_MEMORY_BUDGET=off): nothing limits the containers' sum");
            return;
        }
        let parent = match budget_parent(cfg, docker) {
            Ok(parent) => parent,
            Err(e) => return report(false, format!("cannot tell the containers' parent cgroup: {e}")),
        };
        let mib = cfg.memory_budget >> 20;
        match parent.limit() {
            Some(limit) if limit == cfg.memory_budget => report(
                true,
                format!("the kernel holds the containers ({}) to the memory budget, {mib} MiB", parent.arg),
            ),
            _ if !parent.dir.exists() => println!(
                "! the containers' parent cgroup {} is not made yet: `outline-mcp-proxy set-budget` as root makes \
                 it with its limit ({mib} MiB; the unit's ExecStartPre runs it)",
                parent.arg
            ),
            limit => report(
                false,
                format!(
                    "the kernel's limit on {} is {} MiB, not the budget's {mib} MiB: sudo outline-mcp-proxy set-budget \
                     (the unit's ExecStartPre runs it)",
                    parent.arg,
                    limit.map_or("no".into(), |l| (l >> 20).to_string())
                ),
            ),
        }
    }

    /// The parent cgroup for this host's Docker (its driver and cgroup version).
    fn budget_parent(cfg: &Config, docker: &Docker) -> Result<Parent, String> {
        let (driver, version) = docker.cgroup_setup().map_err(|e| first_line(&e.message()))?;
        Parent::new(&driver, &version, &cfg.cgroup_parent)
    }

    /// `set-budget` (as root, the unit's ExecStartPre): the kernel's limit on the
    /// containers' parent cgroup set to MCP_PROXY_MEMORY_BUDGET.
    pub fn run_set_budget(cfg: &Config) -> ExitCode {
        if cfg.memory_budget == 0 {
            println!("no memory budget (MCP_PROXY_MEMORY_BUDGET=off): nothing to set");
            return ExitCode::SUCCESS;
        }
        let applied = budget_parent(cfg, &Docker::new(&cfg.docker))
            .and_then(|parent| parent.apply_limit(cfg.memory_budget).map(|_| parent));
        match applied {
            Ok(parent) => {
                println!("memory budget {} MiB set on {}", cfg.memory_budget >> 20, parent.arg);
                ExitCode::SUCCESS
            }
            Err(e) => {
                eprintln!("cannot set the memory budget: {e}");
                ExitCode::FAILURE
            }
        }
    }

    /// The OAuth front door: where grants are kept (writable by this user), where
    /// people sign in, and whether Outline accepts the OAuth app's credentials.
    fn check_oauth(cfg: &Config, report: &mut dyn FnMut(bool, String)) {
        if cfg.oauth.path.is_empty() {
            println!("- OAuth front door off (MCP_PROXY_OAUTH_PATH is empty)");
            return;
        }
        match &cfg.oauth.public_url {
            Some(url) => report(true, format!("OAuth front door at {url}{}", cfg.oauth.path)),
            None => println!(
                "! OAuth front door at {}: its URLs come from each request's Host (set MCP_PROXY_PUBLIC_URL)",
                cfg.oauth.path
            ),
        }
        match &cfg.state_dir {
            None => {
                println!("! no state directory: OAuth sign-ins last until the proxy restarts (MCP_PROXY_STATE_DIR)")
            }
            Some(dir) => {
                let probe = dir.join(".check-writable");
                let writable = std::fs::write(&probe, b"").and_then(|_| std::fs::remove_file(&probe));
                match writable {
                    Ok(()) => report(true, format!("OAuth grants are kept in {}", dir.display())),
                    Err(e) => report(false, format!("cannot write OAuth grants in {}: {e}", dir.display())),
                }
            }
        }
        match &cfg.oauth.outline_app {
            None => println!("- people sign in by pasting an Outline API key (no Outline OAuth app is set)"),
            Some(app) => {
                let outline =
                    crate::signin::OutlineApp::new(&cfg.outline_url, &app.client_id, &app.client_secret, &app.scope);
                match outline.credentials_accepted() {
                    Ok(true) => report(true, "Outline accepts the OAuth app's client id and secret".into()),
                    Ok(false) => report(
                        false,
                        "Outline refuses the OAuth app's client id or secret (OUTLINE_OAUTH_CLIENT_ID/_SECRET)".into(),
                    ),
                    Err(_) => report(false, "Outline's /oauth/token does not answer".into()),
                }
            }
        }
    }

    /// Where `systemd/install.sh` puts nginx's site for the proxy.
    const NGINX_SITE: &str = "/etc/nginx/conf.d/mcp.conf";

    /// The seed's verify.sh on an installed host: the services, the health endpoint
    /// through nginx, the certificate's expiry. Skipped where they are not installed.
    fn check_installed_host(report: &mut dyn FnMut(bool, String)) {
        if std::path::Path::new("/run/systemd/system").exists() {
            for (unit, fix) in [
                ("mcp-proxy", "sudo systemctl start mcp-proxy; journalctl -u mcp-proxy -n 50"),
                ("nginx", "sudo nginx -t && sudo systemctl start nginx"),
            ] {
                let state = std::process::Command::new("systemctl")
                    .args(["is-active", unit])
                    .output()
                    .map(|o| String::from_utf8_lossy(&o.stdout).trim().to_string())
                    .unwrap_or_else(|e| e.to_string());
                match state.as_str() {
                    "active" => report(true, format!("service {unit} is active")),
                    other => report(false, format!("service {unit} is {other}: {fix}")),
                }
            }
        }
        let Ok(site) = std::fs::read_to_string(NGINX_SITE) else { return };
        // nginx's own routing is what is checked here, on loopback: the certificate is
        // checked for its expiry below, not for trust (a self-signed one at first)
        let agent = crate::util::agent_base()
            .timeout_global(Some(Duration::from_secs(5)))
            .tls_config(ureq::tls::TlsConfig::builder().disable_verification(true).build())
            .build()
            .new_agent();
        match agent.get("https://127.0.0.1/health").call() {
            Ok(r) if r.status().as_u16() == 200 => {
                report(true, "the health endpoint answers through nginx (https)".into())
            }
            Ok(r) => report(false, format!("through nginx /health answers {}: is the proxy running?", r.status())),
            Err(e) => report(
                false,
                format!(
                    "through nginx /health does not answer ({}): sudo nginx -t; systemctl status nginx",
                    crate::auth::describe_ureq_error(&e)
                ),
            ),
        }
        let certificate = site.lines().find_map(|l| {
            l.trim().strip_prefix("ssl_certificate ").map(|v| v.trim().trim_end_matches(';').to_string())
        });
        if let Some(path) = certificate {
            match certificate_days_left(&path) {
                Some(days) if days > 14 => {
                    report(true, format!("the certificate {path} is valid for {days} more days"))
                }
                Some(days) => {
                    report(false, format!("the certificate {path} expires in {days} days: sudo certbot renew"))
                }
                None => {
                    report(false, format!("cannot read the certificate {path}: sudo certbot --nginx -d <your domain>"))
                }
            }
        }
    }

    /// Days until a PEM certificate's notAfter, by `openssl x509` (on every host nginx
    /// serves TLS from).
    fn certificate_days_left(path: &str) -> Option<i64> {
        let out =
            std::process::Command::new("openssl").args(["x509", "-enddate", "-noout", "-in", path]).output().ok()?;
        let text = String::from_utf8_lossy(&out.stdout);
        let not_after = parse_openssl_date(text.trim().strip_prefix("notAfter=")?)?;
        let now = std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).ok()?.as_secs() as i64;
        Some((not_after - now) / 86400)
    }

    /// `Nov 26 07:00:00 2027 GMT` → Unix seconds.
    pub fn parse_openssl_date(text: &str) -> Option<i64> {
        const MONTHS: [&str; 12] = ["Jan", "Feb", "Mar", "Apr", "May", "Jun", "Jul", "Aug", "Sep", "Oct", "Nov", "Dec"];
        let mut parts = text.split_whitespace();
        let name = parts.next()?;
        let month = MONTHS.iter().position(|m| *m == name)? as i64 + 1;
        let day: i64 = parts.next()?.parse().ok()?;
        let mut hms = parts.next()?.split(':').map(|v| v.parse::<i64>());
        let (h, m, s) = (hms.next()?.ok()?, hms.next()?.ok()?, hms.next()?.ok()?);
        let year: i64 = parts.next()?.parse().ok()?;
        Some(crate::util::days_from_civil(year, month, day) * 86400 + h * 3600 + m * 60 + s)
    }

    /// Can a container on the proxy's network reach Outline? Asked from the image itself
    /// (mcp-outline brings python3); an image without it cannot be asked.
    fn check_outline_from_a_container(cfg: &Config, docker: &Docker, report: &mut dyn FnMut(bool, String)) {
        let url = format!("{}/api/auth.info", cfg.container_outline_url);
        let probe = "import sys, urllib.request, urllib.error\n\
                     try:\n    urllib.request.urlopen(urllib.request.Request(sys.argv[1], data=b'{}', \
                     headers={'Content-Type': 'application/json'}), timeout=5)\n\
                     except urllib.error.HTTPError:\n    pass\n";
        match docker.probe_from_image(&cfg.image, &cfg.network, probe, &url) {
            Ok(true) => report(true, format!("Outline ({url}) answers from a container on {}", cfg.network)),
            Ok(false) => report(
                false,
                format!(
                    "a container on {} cannot reach Outline at {url}: check MCP_PROXY_CONTAINER_OUTLINE_URL and the firewall",
                    cfg.network
                ),
            ),
            Err(_) => println!("! could not ask from a container whether Outline answers (the image has no python3)"),
        }
    }

    /// `cleanup`: remove this proxy's containers stopped longer than REMOVE_AFTER.
    pub fn run_cleanup(cfg: &Config) -> ExitCode {
        if cfg.remove_after.is_none() {
            println!("MCP_PROXY_REMOVE_AFTER is 0: nothing is removed");
            return ExitCode::SUCCESS;
        }
        let docker = Docker::new(&cfg.docker);
        let containers = match docker.list_managed(&cfg.network, &cfg.prefix) {
            Ok(c) => c,
            Err(e) => {
                eprintln!("cannot list containers: {}", e.message());
                return ExitCode::FAILURE;
            }
        };
        let mut failed = false;
        let mut removed = 0;
        let due = containers
            .iter()
            .filter(|c| !c.running && !c.restarting && due_for_removal(c.finished_at, cfg.remove_after));
        for c in due {
            let stopped_for = c.finished_at.and_then(|t| t.elapsed().ok()).unwrap_or_default();
            match docker.remove(&c.name) {
                Ok(()) => {
                    removed += 1;
                    println!("removed {} (stopped {}h ago)", c.name, stopped_for.as_secs() / 3600);
                }
                Err(e) => {
                    failed = true;
                    println!("could not remove {}: {}", c.name, first_line(&e.message()));
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

    #[cfg(test)]
    mod tests {
        use super::*;
        use crate::registry::{Entry, Place, State};
        use crate::tests::test_proxy;
        use crate::util::{format_rfc3339, lock};
        use std::time::Duration;

        #[test]
        fn metrics_render_every_container() {
            let proxy = test_proxy(&[]);
            let place = Place { address: "172.17.0.9:3000".parse().unwrap(), incarnation: None };
            lock(&proxy.containers.registry.entries).insert("mcp-a".into(), Entry::new(State::Running(place)));
            let text = render_metrics(&snapshot(&proxy));
            assert!(text.contains("mcp_proxy_containers_running 1"));
            assert!(text.contains("mcp_proxy_container_up{container=\"mcp-a\"} 1"));
            let stats = render_stats(&snapshot(&proxy));
            assert_eq!(stats["total_containers"], 1);
            assert_eq!(stats["containers"][0]["state"], "running");
        }

        #[test]
        fn certificate_dates_are_read() {
            let t = parse_openssl_date("Nov 26 07:00:00 2027 GMT").unwrap();
            assert_eq!(format_rfc3339(std::time::UNIX_EPOCH + Duration::from_secs(t as u64)), "2027-11-26T07:00:00Z");
            assert_eq!(parse_openssl_date("Feb  3 01:02:03 2030 GMT").map(|t| t % 86400), Some(3723));
            assert_eq!(parse_openssl_date("Foo 1 00:00:00 2030 GMT"), None);
        }
    }
}

mod background {
    //! Owns what runs beside requests, each thread supervised: the sleeper, the Docker
    //! watcher, the event follower (the registry kept exact), the spare keeper, and the
    //! containers' network. Calls `containers`, `registry`, `staged`, `docker`, `auth`,
    //! `memory` (the budget's parent cgroup).
    use crate::containers::{Containers, Want};
    use crate::docker::{DockerError, DockerStatus};
    use crate::error::ProxyError;
    use crate::registry::TransitionResult;
    use crate::util::lock;
    use crate::Proxy;
    use std::net::SocketAddr;
    use std::sync::atomic::Ordering;
    use std::sync::Arc;
    use std::thread;
    use std::time::Duration;
    use std::time::Instant;

    /// Starts the four background threads (sleeper, Docker watcher, event follower,
    /// spare keeper), each supervised; one that cannot be started stops start-up.
    pub fn spawn(proxy: &Arc<Proxy>) -> Result<(), String> {
        keep_running(proxy, "sleeper", "sleeper", |p| {
            thread::sleep(p.cfg.sweep_interval);
            sweep(&p.containers);
            p.auth.prune();
            if let Some(door) = &p.oauth {
                door.prune();
            }
        })?;
        keep_running(proxy, "docker-watch", "Docker watcher", |p| {
            thread::sleep(Duration::from_secs(5));
            watch_docker(&p.containers);
        })?;
        keep_running(proxy, "docker-events", "Docker event follower", |p| {
            follow_events(&p.containers);
            thread::sleep(Duration::from_secs(1));
        })?;
        keep_running(proxy, "spares", "spare keeper", |p| {
            keep_spares(&p.containers);
            p.containers.wait_spare_wanted(Duration::from_secs(2));
        })
    }

    /// A supervised thread that runs `step` over and over for the proxy's life.
    fn keep_running(
        proxy: &Arc<Proxy>,
        thread_name: &str,
        what: &'static str,
        step: impl Fn(&Proxy) + Send + 'static,
    ) -> Result<(), String> {
        let own = proxy.clone();
        let handle = thread::Builder::new()
            .name(thread_name.into())
            .spawn(move || loop {
                step(&own);
            })
            .map_err(|e| format!("cannot start the {what} thread: {e}"))?;
        supervise(proxy, what, handle)
    }

    /// The registry follows Docker's own event stream, so a cached address is never
    /// used for a container that was removed, replaced or restarted behind the
    /// proxy's back. Rebuilt from a fresh listing first (events since then are
    /// replayed); when the stream breaks off (the daemon went away), nothing cached
    /// is trusted until it is rebuilt.
    fn follow_events(containers: &Containers) {
        let since = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map(|d| d.as_secs().saturating_sub(1))
            .unwrap_or(0);
        if rediscover(containers).is_err() {
            return;
        }
        let mut child = match containers.docker.events(&containers.cfg.prefix, since) {
            Ok(child) => child,
            Err(e) => {
                log::warn!("cannot follow Docker's events: {}", e.message());
                return;
            }
        };
        if let Some(stdout) = child.stdout.take() {
            for line in std::io::BufRead::lines(std::io::BufReader::new(stdout)) {
                let Ok(line) = line else { break };
                if let Some(started) =
                    crate::docker::parse_event(&line).and_then(|e| containers.registry.sightings().observe(&e))
                {
                    observe_start(containers, &started);
                }
            }
        }
        let _ = child.kill();
        let _ = child.wait();
        containers.registry.sightings().distrust_all();
        log::warn!("Docker's event stream ended; the registry is rebuilt when Docker answers");
    }

    /// Keeps MCP_PROXY_SPARES spares of the current image booted: boots one at a time,
    /// only when no user's container is starting; replaces those of an older image.
    pub fn keep_spares(containers: &Containers) {
        // looked up even without spares: a stopped container of an older image is
        // replaced rather than woken
        let Some(image_id) = containers.current_image() else { return };
        if containers.cfg.spares == 0 {
            return;
        }
        for (name, flight) in containers.registry.spares().claim_outdated(&image_id) {
            log::info!("replacing spare {name}: {} is now another image", containers.cfg.image);
            match containers.docker.remove_force(&name) {
                Ok(()) | Err(DockerError::NoSuchContainer) => {
                    containers.registry.spares().release(&name, true);
                    flight.finish(Ok(()));
                }
                Err(e) => {
                    // kept in the registry as a spare of an old image: tried again next round
                    log::warn!("could not remove outdated spare {name}: {}", e.message());
                    containers.registry.spares().release(&name, false);
                    flight.finish(Err(e.into_proxy_error(&format!("remove outdated spare {name}"))));
                }
            }
        }
        while containers.registry.spares().wanted(containers.cfg.spares, containers.budget.containers_fit()) {
            let name = format!("{}{}{}", containers.cfg.prefix, crate::docker::SPARE_MARK, random_hex(16));
            let flight = containers.registry.spares().begin(&name);
            let result = boot_spare(containers, &name, &image_id);
            if let Err(e) = &result {
                log::warn!("could not boot spare {name}: {}", e.message());
                let _ = containers.docker.remove_force(&name);
                containers.registry.spares().release(&name, true);
            }
            flight.finish(result.clone());
            if result.is_err() {
                return;
            }
        }
    }

    fn boot_spare(containers: &Containers, name: &str, image_id: &str) -> TransitionResult {
        let begun = Instant::now();
        let spare = Want { name: name.to_string(), user_label: String::new(), env_key: None };
        let mut spec = spare.spec(&containers.cfg, containers.budget.parent_arg());
        spec.role = crate::docker::Role::Spare;
        containers.docker.create(&spec).map_err(|e| e.into_proxy_error(&format!("create spare {name}")))?;
        let (address, _) = containers.inspector.running_address(name)?;
        let incarnation = containers.inspector.wait_until_ready(name, address)?;
        containers.cpus.settle(name);
        containers.registry.spares().ready(name, address, incarnation, image_id);
        log::info!("spare {name} ready in {}ms", begun.elapsed().as_millis());
        Ok(())
    }

    /// The containers' network: made when missing, with inter-container traffic
    /// off; an operator's own network is used as it is (with a warning when its
    /// containers can reach each other).
    pub fn ensure_network(containers: &Containers) -> Result<(), ProxyError> {
        let network = &containers.cfg.network;
        let what = format!("set up network {network}");
        match containers.docker.network_icc(network).map_err(|e| e.into_proxy_error(&what))? {
            Some(false) => Ok(()),
            Some(true) => {
                log::warn!("docker network {network} lets containers reach each other (enable_icc is not false)");
                Ok(())
            }
            None => {
                containers.docker.create_isolated_network(network).map_err(|e| e.into_proxy_error(&what))?;
                log::info!("created docker network {network} (inter-container traffic off)");
                Ok(())
            }
        }
    }

    /// A container someone else started (Docker's restart policy, an operator):
    /// inspected at once, so its new address and incarnation are the ones used.
    pub fn observe_start(containers: &Containers, name: &str) {
        match containers.inspector.inspect(name) {
            Ok(Some(info)) => {
                let address =
                    info.address.filter(|_| info.running).map(|ip| SocketAddr::new(ip, containers.cfg.container_port));
                containers.registry.sightings().started(name, address, info.incarnation);
                containers.sessions.notify_change();
            }
            Ok(None) => {
                // removed again meanwhile: the same as its destroy event
                containers.registry.sightings().observe(&crate::docker::Event::Destroy(name.to_string()));
            }
            Err(e) => log::warn!("could not inspect {name} after it started: {}", e.message()),
        }
    }

    /// `len` random hex digits (sha256 of the time, the process and a counter: names,
    /// not secrets).
    fn random_hex(len: usize) -> String {
        use sha2::{Digest, Sha256};
        static COUNTER: std::sync::atomic::AtomicU64 = std::sync::atomic::AtomicU64::new(0);
        let n = COUNTER.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        let now = std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).unwrap_or_default();
        let digest = Sha256::digest(format!("{}:{}:{n}", now.as_nanos(), std::process::id()));
        hex::encode(digest)[..len.min(64)].to_string()
    }

    /// Liveness the service manager can see: if a thread the proxy cannot do without
    /// (accepting, the sleeper, the watcher) ever ends while not stopping, the process
    /// exits with 70, and systemd's `Restart=on-failure` starts it again.
    pub fn supervise(proxy: &Arc<Proxy>, what: &'static str, handle: thread::JoinHandle<()>) -> Result<(), String> {
        let proxy = proxy.clone();
        thread::Builder::new()
            .name("supervisor".into())
            .spawn(move || {
                let how = if handle.join().is_err() { "panicked" } else { "returned" };
                if !proxy.life.stopping.load(Ordering::SeqCst) {
                    log::error!("the {what} thread {how}; exiting so the service manager restarts the proxy");
                    std::process::exit(70);
                }
            })
            .map(|_| ())
            .map_err(|e| format!("cannot supervise the {what} thread: {e}"))
    }

    /// One pass of the sleeper: stop idle containers (side by side, so one slow
    /// container does not delay the others), remove long-stopped ones.
    pub fn sweep(containers: &Containers) {
        let cfg = &containers.cfg;
        let sweep = containers.registry.sweeps().select(cfg.idle_timeout, cfg.remove_after);
        thread::scope(|scope| {
            let mut stops = Vec::new();
            for (name, flight) in &sweep.stop {
                let stop = move || {
                    containers.put_to_sleep(name);
                    flight.finish(Ok(()));
                };
                match thread::Builder::new().name("stop".into()).spawn_scoped(scope, stop) {
                    Ok(handle) => stops.push((name, handle)),
                    Err(e) => {
                        log::warn!("no thread to stop {name} ({e}); stopping it in turn");
                        stop();
                    }
                }
            }
            for (name, handle) in stops {
                if handle.join().is_err() {
                    log::error!("the thread stopping {name} panicked");
                }
            }
        });
        for (name, flight) in sweep.remove {
            let removed = match containers.docker.remove(&name) {
                Ok(()) => {
                    log::info!("removed container {name}, stopped longer than MCP_PROXY_REMOVE_AFTER");
                    true
                }
                Err(e) => {
                    log::warn!("could not remove {name}: {}", e.message());
                    false
                }
            };
            containers.registry.sweeps().after_remove(&name, removed);
            flight.finish(Ok(()));
        }
    }

    /// Rebuilds the registry from the labelled containers Docker knows, so a
    /// restarted proxy reuses every container.
    fn rediscover(containers: &Containers) -> Result<usize, ProxyError> {
        let cfg = &containers.cfg;
        ensure_network(containers)?;
        learn_cgroup_parent(containers)?;
        let listed = containers
            .docker
            .list_managed(&cfg.network, &cfg.prefix)
            .map_err(|e| e.into_proxy_error("list containers"))?;
        containers.registry.sightings().reconcile(&listed, cfg.container_port);
        containers.registry.staged.keep_running(&listed);
        Ok(listed.len())
    }

    /// With a memory budget, the containers' parent cgroup, from Docker's driver (before
    /// any container is made).
    fn learn_cgroup_parent(containers: &Containers) -> Result<(), ProxyError> {
        if !containers.budget.is_on() || containers.budget.parent_arg().is_some() {
            return Ok(());
        }
        let (driver, version) =
            containers.docker.cgroup_setup().map_err(|e| e.into_proxy_error("tell its cgroup driver"))?;
        if let Err(e) = containers.budget.learn_parent(&driver, &version) {
            log::error!("MCP_PROXY_MEMORY_BUDGET is not held by the kernel: {e}");
        }
        Ok(())
    }

    /// At start-up: adopt this proxy's containers (and learn the current image's id, so
    /// no wake pays for that lookup), or note that Docker is away.
    pub fn adopt_existing(containers: &Containers) {
        containers.current_image();
        match rediscover(containers) {
            Ok(n) => log::info!("found {n} existing container(s) of this proxy"),
            Err(e) => {
                log::error!("Docker is not available at start-up: {}", e.message());
                *lock(&containers.docker_status) = DockerStatus::AwayAtStartUp;
            }
        }
    }

    /// Asks Docker whether it answers; on its return, rebuilds the registry.
    fn watch_docker(containers: &Containers) {
        let now = match containers.docker.server_version() {
            Ok(_) => DockerStatus::Answering,
            Err(e) => DockerStatus::Away(e),
        };
        let was = std::mem::replace(&mut *lock(&containers.docker_status), now.clone());
        match (was.is_answering(), now.reason()) {
            (true, Some(reason)) => log::error!("Docker stopped answering: {reason}"),
            // the event follower rebuilds the registry when Docker is back
            (false, None) => log::info!("Docker answers again"),
            _ => {}
        }
    }

    #[cfg(test)]
    mod tests {
        use super::*;
        use crate::registry::{Plan, State};
        use crate::tests::{edit_exchange, running_entry, test_proxy};
        use crate::util::lock;
        use std::net::SocketAddr;

        #[test]
        fn idle_selection_skips_busy_and_recent_containers() {
            // spares off: idle containers are stopped (kept for a docker start); spares on:
            // removed (a spare serves the next wake)
            for (spares, slept) in [("0", State::Stopped), ("1", State::Missing)] {
                let settings = [
                    ("MCP_PROXY_IDLE_TIMEOUT", "60s"),
                    ("MCP_PROXY_DOCKER", "/bin/true"),
                    ("MCP_PROXY_SPARES", spares),
                ];
                let proxy = test_proxy(&settings);
                let addr: SocketAddr = "172.17.0.9:3000".parse().unwrap();
                for (name, idle_secs, active) in [("mcp-idle", 120, 0), ("mcp-busy", 120, 1), ("mcp-recent", 10, 0)] {
                    lock(&proxy.containers.registry.entries)
                        .insert(name.to_string(), running_entry(addr, idle_secs, active));
                }
                sweep(&proxy.containers);
                let entries = lock(&proxy.containers.registry.entries);
                assert_eq!(entries["mcp-idle"].state, slept);
                assert!(entries["mcp-busy"].state.is_running());
                assert!(entries["mcp-recent"].state.is_running());
            }
        }

        #[test]
        fn a_container_holding_staged_edits_neither_sleeps_nor_makes_room() {
            let settings = [
                ("MCP_PROXY_IDLE_TIMEOUT", "60s"),
                ("MCP_PROXY_DOCKER", "/bin/true"),
                ("MCP_PROXY_MAX_RUNNING", "2"),
                ("MCP_PROXY_SPARES", "1"),
            ];
            let proxy = test_proxy(&settings);
            let registry = &proxy.containers.registry;
            let addr: SocketAddr = "172.17.0.9:3000".parse().unwrap();
            for name in ["mcp-staged", "mcp-plain"] {
                lock(&registry.entries).insert(name.to_string(), running_entry(addr, 3600, 0));
            }
            let staged = "Applied 1 edit(s) to 'N'. Document has unsaved changes — call edit_document with save=True.";
            let (call, answer) = edit_exchange(1, false, staged);
            registry.staged.note_answer("mcp-staged", None, &crate::staged::edit_call(&call).unwrap(), &answer);
            assert!(!registry.staged.may_sleep("mcp-staged") && registry.staged.may_sleep("mcp-plain"));
            // at the cap, the one without staged edits makes room
            let Plan::Start { evict, flight, .. } = registry.plan("mcp-new", "U", false, usize::MAX).unwrap() else {
                panic!("expected a start")
            };
            assert_eq!(evict.as_deref(), Some("mcp-plain"));
            registry.sweeps().after_stop("mcp-plain", crate::registry::StopOutcome::Retired);
            registry.finish_transition("mcp-new", &flight, Ok(()));
            lock(&registry.entries).insert("mcp-new".into(), running_entry(addr, 0, 1));
            // and when only it could, the request gets 503 with Retry-After
            let err = registry.plan("mcp-other", "U", false, usize::MAX).err().unwrap();
            assert_eq!((err.status(), err.retry_after()), (503, Some(30)));
            // the sweep leaves it running; a save lets it go
            sweep(&proxy.containers);
            assert!(lock(&registry.entries)["mcp-staged"].state.is_running());
            let (call, answer) = edit_exchange(2, true, "Applied 0 edit(s) to 'N'. Saved to Outline.");
            registry.staged.note_answer("mcp-staged", None, &crate::staged::edit_call(&call).unwrap(), &answer);
            sweep(&proxy.containers);
            assert_eq!(lock(&registry.entries)["mcp-staged"].state, State::Missing);
        }
    }
}

mod signals {
    //! Owns SIGTERM and SIGINT: blocked in every thread (the mask is set before any
    //! thread starts and is inherited), taken by the main thread with `sigwait`.
    //! Calls the C library std already links (Linux-only); no signal crate.
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

    /// The set {SIGTERM, SIGINT}; each C call's return code checked.
    fn term_set() -> std::io::Result<SigSet> {
        let mut set = SigSet([0; 16]);
        // SAFETY: `set` is a valid, writable sigset_t-sized buffer.
        let codes = unsafe { [sigemptyset(&mut set), sigaddset(&mut set, SIGTERM), sigaddset(&mut set, SIGINT)] };
        match codes.iter().all(|&rc| rc == 0) {
            true => Ok(set),
            false => Err(std::io::Error::last_os_error()),
        }
    }

    /// Blocks SIGTERM and SIGINT in this thread and every thread it starts later.
    pub fn block_term() -> std::io::Result<()> {
        let set = term_set()?;
        // SAFETY: valid set pointer; a null old-set pointer is allowed.
        match unsafe { pthread_sigmask(SIG_BLOCK, &set, std::ptr::null_mut()) } {
            0 => Ok(()),
            rc => Err(std::io::Error::from_raw_os_error(rc)),
        }
    }

    /// Waits for SIGTERM or SIGINT; an error when the wait itself failed.
    pub fn wait_for_term() -> std::io::Result<()> {
        let set = term_set()?;
        let mut sig = 0i32;
        // SAFETY: valid set and output pointers.
        match unsafe { sigwait(&set, &mut sig) } {
            0 => Ok(()),
            rc => Err(std::io::Error::from_raw_os_error(rc)),
        }
    }
}

mod util {
    //! Owns small shared helpers: lock recovery, single flights, the HTTP clients' common
    //! settings, constant-time compare, base64, RFC 3339 times, secret keys kept in the
    //! state directory. Calls std, ureq and log only.
    use std::sync::{Arc, Condvar, Mutex, MutexGuard};
    use std::time::{Duration, SystemTime, UNIX_EPOCH};

    /// A poisoned lock (a thread panicked holding it) still guards consistent data
    /// here: every critical section is a few field updates. Carry on with it.
    pub fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
        m.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// A result many threads wait for while one thread works it out.
    pub struct Flight<T: Clone> {
        result: Mutex<Option<T>>,
        done: Condvar,
    }

    impl<T: Clone> Flight<T> {
        pub fn new() -> Arc<Flight<T>> {
            Arc::new(Flight { result: Mutex::new(None), done: Condvar::new() })
        }

        pub fn finish(&self, value: T) {
            *lock(&self.result) = Some(value);
            self.done.notify_all();
        }

        pub fn wait(&self) -> T {
            let mut guard = lock(&self.result);
            loop {
                if let Some(value) = guard.as_ref() {
                    return value.clone();
                }
                guard = self.done.wait(guard).unwrap_or_else(|e| e.into_inner());
            }
        }
    }

    /// What every HTTP client of the proxy shares: statuses are answers, not errors;
    /// redirects are not followed; no proxy is taken from the environment (ureq reads
    /// HTTP_PROXY by default).
    pub fn agent_base() -> ureq::config::ConfigBuilder<ureq::typestate::AgentScope> {
        ureq::Agent::config_builder().http_status_as_error(false).max_redirects(0).proxy(None)
    }

    pub fn constant_time_eq(a: &[u8], b: &[u8]) -> bool {
        let mut diff = (a.len() ^ b.len()) as u8 | u8::from(a.len() != b.len());
        for i in 0..a.len().max(b.len()) {
            diff |= a.get(i).copied().unwrap_or(0) ^ b.get(i).copied().unwrap_or(0);
        }
        diff == 0
    }

    pub fn base64_encode(input: &[u8]) -> String {
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

    /// Standard base64 (padding optional); None for anything else.
    pub fn base64_decode(text: &str) -> Option<Vec<u8>> {
        let value = |c: u8| -> Option<u32> {
            match c {
                b'A'..=b'Z' => Some(u32::from(c - b'A')),
                b'a'..=b'z' => Some(u32::from(c - b'a') + 26),
                b'0'..=b'9' => Some(u32::from(c - b'0') + 52),
                b'+' => Some(62),
                b'/' => Some(63),
                _ => None,
            }
        };
        let digits = text.trim_end_matches('=').as_bytes();
        if digits.len() % 4 == 1 {
            return None;
        }
        let mut out = Vec::with_capacity(digits.len() * 3 / 4);
        for chunk in digits.chunks(4) {
            let mut n = 0u32;
            for (i, c) in chunk.iter().enumerate() {
                n |= value(*c)? << (18 - 6 * i);
            }
            out.extend_from_slice(&n.to_be_bytes()[1..chunk.len()]);
        }
        Some(out)
    }

    /// base64url without padding (RFC 4648 §5): tokens, ids and PKCE challenges.
    pub fn base64url(input: &[u8]) -> String {
        base64_encode(input).trim_end_matches('=').replace('+', "-").replace('/', "_")
    }

    /// A 256-bit secret kept in `dir/name` (mode 0600, made on first use) so that it
    /// outlives restarts; without a directory, a new one for this run. A file that is
    /// not such a key is set aside (`name.unreadable-{time}`) and a new key made.
    pub fn kept_key(dir: Option<&std::path::Path>, name: &str) -> std::io::Result<[u8; 32]> {
        use std::io::{Read, Write};
        use std::os::unix::fs::OpenOptionsExt;
        let mut key = [0u8; 32];
        let Some(dir) = dir else {
            std::fs::File::open("/dev/urandom")?.read_exact(&mut key)?;
            return Ok(key);
        };
        let path = dir.join(name);
        match std::fs::read(&path) {
            Ok(bytes) if bytes.len() == key.len() => {
                key.copy_from_slice(&bytes);
                return Ok(key);
            }
            Ok(_) => {
                let aside = dir.join(format!("{name}.unreadable-{}", now_unix()));
                log::warn!("{} is not a key; set aside as {}", path.display(), aside.display());
                std::fs::rename(&path, aside)?;
            }
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
            Err(e) => return Err(e),
        }
        std::fs::File::open("/dev/urandom")?.read_exact(&mut key)?;
        let mut file = std::fs::OpenOptions::new().write(true).create_new(true).mode(0o600).open(&path)?;
        file.write_all(&key)?;
        file.sync_all()?;
        Ok(key)
    }

    pub fn now_unix() -> u64 {
        SystemTime::now().duration_since(UNIX_EPOCH).map(|d| d.as_secs()).unwrap_or(0)
    }

    /// Percent-encodes all but RFC 3986's unreserved characters (for a query value).
    pub fn percent_encode(text: &str) -> String {
        let mut out = String::with_capacity(text.len());
        for b in text.bytes() {
            if b.is_ascii_alphanumeric() || b"-._~".contains(&b) {
                out.push(b as char);
            } else {
                out.push_str(&format!("%{b:02X}"));
            }
        }
        out
    }

    /// A form value or query part: `+` is a space, `%XX` a byte; bad escapes stay as sent.
    pub fn percent_decode(text: &str) -> String {
        let bytes = text.as_bytes();
        let mut out = Vec::with_capacity(bytes.len());
        let mut i = 0;
        while i < bytes.len() {
            let hex = |j: usize| bytes.get(j).and_then(|b| (*b as char).to_digit(16));
            match bytes[i] {
                b'+' => out.push(b' '),
                b'%' if hex(i + 1).is_some() && hex(i + 2).is_some() => {
                    out.push((hex(i + 1).unwrap_or(0) * 16 + hex(i + 2).unwrap_or(0)) as u8);
                    i += 2;
                }
                b => out.push(b),
            }
            i += 1;
        }
        String::from_utf8_lossy(&out).into_owned()
    }

    /// `application/x-www-form-urlencoded` (or a query string) → name, value pairs.
    pub fn parse_form(body: &[u8]) -> Vec<(String, String)> {
        String::from_utf8_lossy(body)
            .split('&')
            .filter(|pair| !pair.is_empty())
            .map(|pair| {
                let (name, value) = pair.split_once('=').unwrap_or((pair, ""));
                (percent_decode(name), percent_decode(value))
            })
            .collect()
    }

    /// Days since 1970-01-01 of a civil date (Howard Hinnant's algorithm).
    pub fn days_from_civil(y: i64, m: i64, d: i64) -> i64 {
        let y = if m <= 2 { y - 1 } else { y };
        let era = y.div_euclid(400);
        let yoe = y - era * 400;
        let doy = (153 * (m + if m > 2 { -3 } else { 9 }) + 2) / 5 + d - 1;
        let doe = yoe * 365 + yoe / 4 - yoe / 100 + doy;
        era * 146097 + doe - 719468
    }

    pub fn civil_from_days(z: i64) -> (i64, i64, i64) {
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
    pub fn parse_rfc3339(text: &str) -> Option<SystemTime> {
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

    pub fn format_rfc3339(t: SystemTime) -> String {
        let secs = t.duration_since(UNIX_EPOCH).map(|d| d.as_secs() as i64).unwrap_or(0);
        let (y, m, d) = civil_from_days(secs.div_euclid(86400));
        let rem = secs.rem_euclid(86400);
        format!("{y:04}-{m:02}-{d:02}T{:02}:{:02}:{:02}Z", rem / 3600, rem % 3600 / 60, rem % 60)
    }

    #[cfg(test)]
    mod tests {
        use super::*;

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
        fn a_kept_key_is_made_once_with_mode_0600_and_read_back() {
            use std::os::unix::fs::PermissionsExt;
            let dir = std::env::temp_dir().join(format!("omp-key-{}", std::process::id()));
            std::fs::create_dir_all(&dir).unwrap();
            let made = kept_key(Some(&dir), "k.key").unwrap();
            let mode = std::fs::metadata(dir.join("k.key")).unwrap().permissions().mode() & 0o777;
            assert_eq!(mode, 0o600);
            assert_eq!(kept_key(Some(&dir), "k.key").unwrap(), made);
            std::fs::write(dir.join("k.key"), b"short").unwrap();
            let remade = kept_key(Some(&dir), "k.key").unwrap();
            assert_ne!(remade, made);
            assert_ne!(kept_key(None, "k.key").unwrap(), kept_key(None, "k.key").unwrap());
            std::fs::remove_dir_all(&dir).unwrap();
        }

        #[test]
        fn forms_and_percent_encoding() {
            assert_eq!(
                parse_form(b"a=1&b=x+y%2Bz&c&d=%zz"),
                vec![
                    ("a".into(), "1".into()),
                    ("b".into(), "x y+z".into()),
                    ("c".into(), "".into()),
                    ("d".into(), "%zz".into())
                ]
            );
            assert_eq!(percent_encode("a b/c?d=é"), "a%20b%2Fc%3Fd%3D%C3%A9");
            assert_eq!(percent_decode(&percent_encode("a b/c?d=é&")), "a b/c?d=é&");
            for bytes in [&b""[..], b"a", b"ab", b"abc", b"abcd", b"client:s\xffcret"] {
                assert_eq!(base64_decode(&base64_encode(bytes)).as_deref(), Some(bytes));
            }
            assert_eq!(base64_decode("Y2xpZW50OnNlY3JldA"), Some(b"client:secret".to_vec()));
            assert_eq!(base64_decode("a"), None);
            assert_eq!(base64_decode("Y2x*"), None);
        }
    }
}

#[cfg(test)]
mod tests {
    //! What several chapters' unit tests share: settings from pairs, a request, a Proxy.
    use crate::config::Config;
    use crate::registry::{Entry, Place, State};
    use crate::wire::Incoming;
    use crate::Proxy;
    use std::collections::HashMap;
    use std::net::SocketAddr;
    use std::time::{Duration, Instant};

    pub(crate) fn env(pairs: &[(&str, &str)]) -> impl Fn(&str) -> Option<String> {
        let map: HashMap<String, String> = pairs.iter().map(|(k, v)| (k.to_string(), v.to_string())).collect();
        move |name| map.get(name).cloned()
    }

    pub(crate) fn incoming(headers: &[(&str, &str)]) -> Incoming {
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

    pub(crate) fn test_proxy(pairs: &[(&str, &str)]) -> Proxy {
        Proxy::new(Config::load(&env(pairs)).unwrap(), crate::sessions::SessionKey::from_bytes([7; 32]))
    }

    pub(crate) fn running_entry(address: SocketAddr, idle_secs: u64, active: usize) -> Entry {
        let mut e = Entry::new(State::Running(Place { address, incarnation: None }));
        e.idle_since = Instant::now() - Duration::from_secs(idle_secs);
        e.active = active;
        e
    }

    /// A JSON-RPC `edit_document` call and the answer mcp-outline 1.10 gives it.
    pub(crate) fn edit_exchange(id: u64, save: bool, answer: &str) -> (serde_json::Value, serde_json::Value) {
        let call = serde_json::json!({"jsonrpc": "2.0", "id": id, "method": "tools/call", "params": {
            "name": "edit_document", "arguments": {"document_id": "doc-1", "edits": [], "save": save}}});
        let result = serde_json::json!({"jsonrpc": "2.0", "id": id, "result": {
            "content": [{"type": "text", "text": answer}], "isError": false}});
        (call, result)
    }
}
