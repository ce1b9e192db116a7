//! The dashboard server: API + pages + OpenAPI docs behind security headers,
//! over plain HTTP or rustls TLS.

use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use anyhow::{Context, Result};
use axum::Router;
use axum::extract::Request;
use axum::http::{HeaderValue, StatusCode, header};
use axum::middleware::{self, Next};
use axum::response::{Html, IntoResponse, Redirect, Response};
use axum::routing::get;
use utoipa::OpenApi;
use utoipa_swagger_ui::SwaggerUi;

use crate::api::{self, AppState, UploadLimits};
use crate::atrest::AtRest;
use crate::auth::{self, ClientAddress, LoginLimit, LoginLimiter, TokenLife, Tokens};
use crate::infer::Predictor;
use crate::live::Shared;
use crate::store::{Role, Store};

/// How the dashboard is set up.
#[derive(Debug, Clone)]
pub struct WebConfig {
    /// `DATABASE_URL`.
    pub database_url: String,
    /// The JWT signing secret (`JWT_SECRET` / `JWT_SECRET_FILE`); a random one
    /// per process when unset (tokens then end with the process).
    pub jwt_secret: Option<String>,
    /// How long access tokens and sessions live.
    pub token_life: TokenLife,
    /// Login attempts.
    pub login_limit: LoginLimit,
    /// Where the client's address comes from (`TRUSTED_PROXIES`).
    pub client_address: ClientAddress,
    /// Bounds on connections, requests and event streams.
    pub server: ServerLimits,
    /// Upload limits.
    pub uploads: UploadLimits,
    /// TLS certificate and key (PEM), when the server should speak HTTPS.
    pub tls: Option<(PathBuf, PathBuf)>,
    /// Encryption at rest.
    pub at_rest: Option<AtRest>,
}

impl WebConfig {
    /// From the environment: `DATABASE_URL` (default `sqlite://<default_db>`),
    /// `JWT_SECRET[_FILE]`, `TLS_CERT` + `TLS_KEY`, `FEDCORE_DATA_KEY[_FILE]`,
    /// `TRUSTED_PROXIES`.
    pub fn from_env(default_db: &std::path::Path) -> Result<Self> {
        let database_url = std::env::var("DATABASE_URL")
            .unwrap_or_else(|_| format!("sqlite://{}?mode=rwc", default_db.display()));
        let tls = match (std::env::var("TLS_CERT"), std::env::var("TLS_KEY")) {
            (Ok(c), Ok(k)) => Some((PathBuf::from(c), PathBuf::from(k))),
            (Err(_), Err(_)) => None,
            _ => anyhow::bail!("set both TLS_CERT and TLS_KEY (PEM files) or neither"),
        };
        Ok(Self {
            database_url,
            jwt_secret: auth::secret_from_env("JWT_SECRET")?,
            token_life: TokenLife::default(),
            login_limit: LoginLimit::default(),
            client_address: ClientAddress::from_env()?,
            server: ServerLimits::default(),
            uploads: UploadLimits::default(),
            tls,
            at_rest: AtRest::from_env()?,
        })
    }
}

/// Bounds on what clients can hold open. Slow or idle clients are cut off
/// by hyper's header-read timeout and tower-http's request timeout; the
/// number of connections and of event streams is capped.
#[derive(Debug, Clone, Copy)]
pub struct ServerLimits {
    /// A request's headers must arrive within this (slow-header clients).
    pub header_read_timeout: Duration,
    /// A response must start within this (slow uploads included); event
    /// streams, once started, are not cut.
    pub request_timeout: Duration,
    /// Open connections; more are closed as they arrive.
    pub max_connections: usize,
    /// Open connections from one address (a trusted proxy's not counted).
    pub max_connections_per_address: usize,
    /// Open event streams on the server.
    pub max_event_streams: usize,
    /// Open event streams of one user.
    pub max_event_streams_per_user: usize,
}

impl Default for ServerLimits {
    fn default() -> Self {
        Self {
            header_read_timeout: Duration::from_secs(10),
            request_timeout: Duration::from_secs(30),
            max_connections: 512,
            max_connections_per_address: 128,
            max_event_streams: 128,
            max_event_streams_per_user: 4,
        }
    }
}

/// Refuses to serve the dashboard in the clear beyond this machine: on an
/// address other than loopback it needs TLS (`TLS_CERT` + `TLS_KEY`), or
/// `behind_tls_proxy` when a proxy in front of it terminates HTTPS.
pub fn check_exposure(addr: std::net::SocketAddr, tls: bool, behind_tls_proxy: bool) -> Result<()> {
    if addr.ip().is_loopback() || tls || behind_tls_proxy {
        return Ok(());
    }
    anyhow::bail!(
        "the dashboard would listen on {addr} without TLS, sending passwords and tokens in the clear: set TLS_CERT and TLS_KEY (PEM files), or pass --behind-tls-proxy when a TLS proxy in front of it terminates HTTPS"
    )
}

/// Opens the store and builds the state.
pub async fn state(
    config: &WebConfig,
    shared: Arc<Shared>,
    predictor: Arc<Predictor>,
) -> Result<AppState> {
    let store = Store::connect(&config.database_url).await?;
    let secret = match &config.jwt_secret {
        Some(s) => s.as_bytes().to_vec(),
        None => {
            use rand::RngExt;
            let mut k = vec![0u8; 32];
            rand::rng().fill(&mut k[..]);
            k
        }
    };
    // Suspensions survive a restart of the dashboard.
    let suspended: Vec<String> = store
        .clients()
        .await?
        .into_iter()
        .filter(|c| c.status == crate::store::ClientStatus::Suspended)
        .map(|c| c.id)
        .collect();
    if let Ok(mut s) = shared.suspended.lock() {
        s.extend(suspended);
    }
    Ok(AppState {
        store,
        tokens: Tokens::new(&secret, config.token_life)?,
        limiter: LoginLimiter::new(config.login_limit)?,
        shared,
        predictor,
        at_rest: config.at_rest.clone(),
        uploads: config.uploads,
        decodes: Arc::new(tokio::sync::Semaphore::new(
            config.uploads.max_concurrent_decodes.max(1),
        )),
        tls: config.tls.is_some(),
        client_address: Arc::new(config.client_address.clone()),
        revocations: tokio::sync::broadcast::channel(64).0,
        streams: api::EventStreams::new(
            config.server.max_event_streams,
            config.server.max_event_streams_per_user,
        ),
        request_timeout: config.server.request_timeout,
        jobs: None,
        federation: None,
    })
}

/// Creates the three demo users when the store has no user yet. Passwords
/// come from `HOSPITAL_{ADMIN,DOCTOR,VIEWER}_PASSWORD` (or `_FILE`), or are
/// generated; generated ones are returned to be printed once.
pub async fn bootstrap_users(store: &Store) -> Result<Vec<(String, Role, String)>> {
    if !store.users().await?.is_empty() {
        return Ok(Vec::new());
    }
    let mut printed = Vec::new();
    for (name, role) in [
        ("admin", Role::Admin),
        ("doctor", Role::Doctor),
        ("viewer", Role::Viewer),
    ] {
        let var = format!("HOSPITAL_{}_PASSWORD", name.to_ascii_uppercase());
        let (password, generated) = match auth::secret_from_env(&var)? {
            Some(p) => {
                auth::check_password(&p, &[name]).map_err(|e| anyhow::anyhow!("{var}: {e}"))?;
                (p, false)
            }
            None => (auth::generate_password(), true),
        };
        let hash = tokio::task::spawn_blocking(move || {
            let h = auth::hash_password(&password);
            h.map(|h| (h, password))
        })
        .await??;
        store.create_user(name, &hash.0, role).await?;
        if generated {
            printed.push((name.to_owned(), role, hash.1));
        }
    }
    Ok(printed)
}

const CSP: &str = "default-src 'self'; script-src 'self'; style-src 'self'; img-src 'self' data: blob:; \
    connect-src 'self'; font-src 'self'; object-src 'none'; base-uri 'none'; form-action 'self'; \
    frame-ancestors 'none'";
/// Swagger UI styles itself inline.
const CSP_DOCS: &str = "default-src 'self'; script-src 'self'; style-src 'self' 'unsafe-inline'; \
    img-src 'self' data:; connect-src 'self'; object-src 'none'; base-uri 'none'; frame-ancestors 'none'";

async fn security_headers(tls: bool, req: Request, next: Next) -> Response {
    let docs = req.uri().path().starts_with("/docs");
    let mut r = next.run(req).await;
    let h = r.headers_mut();
    let csp = if docs { CSP_DOCS } else { CSP };
    h.insert(
        header::CONTENT_SECURITY_POLICY,
        HeaderValue::from_static(csp),
    );
    h.insert(header::X_FRAME_OPTIONS, HeaderValue::from_static("DENY"));
    h.insert(
        header::X_CONTENT_TYPE_OPTIONS,
        HeaderValue::from_static("nosniff"),
    );
    h.insert(
        header::REFERRER_POLICY,
        HeaderValue::from_static("no-referrer"),
    );
    h.insert(
        "permissions-policy",
        HeaderValue::from_static("camera=(), microphone=(), geolocation=()"),
    );
    if !h.contains_key(header::CACHE_CONTROL) {
        h.insert(header::CACHE_CONTROL, HeaderValue::from_static("no-store"));
    }
    if tls {
        h.insert(
            header::STRICT_TRANSPORT_SECURITY,
            HeaderValue::from_static("max-age=31536000; includeSubDomains"),
        );
    }
    r
}

/// Every error answer is `{"error": "..."}` (docs/dashboard.md): the
/// handlers' own errors are already; this turns the rest into it, keeping
/// the status and headers (`Allow`, `Retry-After`): the framework's
/// rejections (malformed JSON 400, wrong content type 415, missing field
/// 422, a bad path or query 400, a body over the limit 413, a method not
/// allowed 405) and the request timeout (408), which come as plain text or
/// empty.
async fn json_errors(req: Request, next: Next) -> Response {
    let r = next.run(req).await;
    let status = r.status();
    if !(status.is_client_error() || status.is_server_error()) {
        return r;
    }
    let is_json = r
        .headers()
        .get(header::CONTENT_TYPE)
        .and_then(|v| v.to_str().ok())
        .is_some_and(|v| v.starts_with("application/json"));
    if is_json {
        return r;
    }
    let (mut parts, body) = r.into_parts();
    let text = axum::body::to_bytes(body, 16 * 1024)
        .await
        .map(|b| String::from_utf8_lossy(&b).trim().to_owned())
        .unwrap_or_default();
    let error = if text.is_empty() {
        status
            .canonical_reason()
            .unwrap_or("error")
            .to_ascii_lowercase()
    } else {
        text
    };
    let body = serde_json::to_vec(&api::ErrorBody { error }).unwrap_or_default();
    parts.headers.insert(
        header::CONTENT_TYPE,
        HeaderValue::from_static("application/json"),
    );
    parts.headers.remove(header::CONTENT_LENGTH);
    Response::from_parts(parts, axum::body::Body::from(body))
}

fn asset(content_type: &'static str, body: &'static str) -> Response {
    ([(header::CONTENT_TYPE, content_type)], body).into_response()
}

const UPLOT_JS: &str = include_str!("../assets/vendor/uPlot.iife.min.js");
const UPLOT_CSS: &str = include_str!("../assets/vendor/uPlot.min.css");
const UPLOT_LICENSE: &str = include_str!("../assets/vendor/uPlot.LICENSE");

/// The whole application: API, pages, docs, headers.
pub fn app(state: AppState) -> Router {
    let tls = state.tls;
    let timeout = state.request_timeout;
    Router::new()
        .merge(api::routes(&state))
        .merge(SwaggerUi::new("/docs").url("/api/openapi.json", api::ApiDoc::openapi()))
        .route("/", get(|| async { Redirect::to("/app") }))
        .route(
            "/login",
            get(|| async { Html(include_str!("../assets/login.html")) }),
        )
        .route(
            "/app",
            get(|| async { Html(include_str!("../assets/app.html")) }),
        )
        .route(
            "/assets/app.js",
            get(|| async {
                asset(
                    "text/javascript; charset=utf-8",
                    include_str!("../assets/app.js"),
                )
            }),
        )
        .route(
            "/assets/login.js",
            get(|| async {
                asset(
                    "text/javascript; charset=utf-8",
                    include_str!("../assets/login.js"),
                )
            }),
        )
        .route(
            "/assets/app.css",
            get(|| async { asset("text/css; charset=utf-8", include_str!("../assets/app.css")) }),
        )
        // The charting library (uPlot, MIT), vendored from npm by
        // scripts/vendor-web.sh at the version apps/hospital/web's lock pins.
        .route(
            "/assets/vendor/uPlot.iife.min.js",
            get(|| async { asset("text/javascript; charset=utf-8", UPLOT_JS) }),
        )
        .route(
            "/assets/vendor/uPlot.min.css",
            get(|| async { asset("text/css; charset=utf-8", UPLOT_CSS) }),
        )
        .route(
            "/assets/vendor/uPlot.LICENSE",
            get(|| async { asset("text/plain; charset=utf-8", UPLOT_LICENSE) }),
        )
        .fallback(|| async {
            (
                StatusCode::NOT_FOUND,
                axum::Json(api::ErrorBody {
                    error: "not found".into(),
                }),
            )
        })
        .with_state(state)
        .layer(tower_http::timeout::TimeoutLayer::with_status_code(
            StatusCode::REQUEST_TIMEOUT,
            timeout,
        ))
        .layer(middleware::from_fn(json_errors))
        .layer(middleware::from_fn(move |req, next| {
            security_headers(tls, req, next)
        }))
}

/// Serves `app` on `addr` until the process ends; HTTPS with rustls when the
/// config names a certificate. Returns the bound address through `bound`.
///
/// HTTP/1.1 only (browsers speak it; no protocol sniffing that would wait
/// for a first byte without a timeout), so hyper's header-read timeout runs
/// from the moment a connection waits for a request: a client that says
/// nothing, sends headers slowly or idles between requests is cut off after
/// `limits.header_read_timeout`. At most `limits.max_connections` are open,
/// `limits.max_connections_per_address` from one address (not counting
/// `trusted_proxies`); more are closed as they arrive.
pub async fn serve(
    app: Router,
    addr: SocketAddr,
    tls: Option<&(PathBuf, PathBuf)>,
    limits: ServerLimits,
    trusted_proxies: &[std::net::IpAddr],
    bound: tokio::sync::oneshot::Sender<SocketAddr>,
) -> Result<()> {
    let make = app.into_make_service_with_connect_info::<SocketAddr>();
    let listener =
        std::net::TcpListener::bind(addr).with_context(|| format!("cannot listen on {addr}"))?;
    listener.set_nonblocking(true)?;
    let local = listener.local_addr()?;
    let connections = fedcore::net::Connections::with_exempt(
        limits.max_connections,
        limits.max_connections_per_address,
        trusted_proxies,
    );
    let tls = match tls {
        None => None,
        Some((cert, key)) => {
            let _ = rustls::crypto::ring::default_provider().install_default();
            let config = axum_server::tls_rustls::RustlsConfig::from_pem_file(cert, key)
                .await
                .with_context(|| {
                    format!("TLS certificate {} / key {}", cert.display(), key.display())
                })?;
            // HTTP/1.1 is all this server speaks: say so in the handshake.
            let mut inner = (*config.get_inner()).clone();
            inner.alpn_protocols = vec![b"http/1.1".to_vec()];
            Some(axum_server::tls_rustls::RustlsAcceptor::new(
                axum_server::tls_rustls::RustlsConfig::from_config(Arc::new(inner)),
            ))
        }
    };
    let acceptor = Capped {
        tls,
        connections,
        first_byte: limits.header_read_timeout,
    };
    let mut server = axum_server::from_tcp(listener)?
        .acceptor(acceptor)
        .http1_only();
    server
        .http_builder()
        .http1()
        .timer(hyper_util::rt::TokioTimer::new())
        .header_read_timeout(limits.header_read_timeout);
    let _ = bound.send(local);
    server.serve(make).await?;
    Ok(())
}
/// The acceptor: counts the connection against the caps (over one, it is
/// closed), waits at most `first_byte` for the client to send anything
/// (before the TLS handshake, whose own timeout follows), then speaks TLS
/// when configured.
#[derive(Clone)]
struct Capped {
    tls: Option<axum_server::tls_rustls::RustlsAcceptor>,
    connections: fedcore::net::Connections,
    first_byte: Duration,
}

type TlsStream<S> = <axum_server::tls_rustls::RustlsAcceptor as axum_server::accept::Accept<
    fedcore::net::Counted,
    S,
>>::Stream;

impl<S: Send + 'static> axum_server::accept::Accept<tokio::net::TcpStream, S> for Capped {
    type Stream = tokio_util::either::Either<fedcore::net::Counted, TlsStream<S>>;
    type Service = S;
    type Future = std::pin::Pin<
        Box<dyn std::future::Future<Output = std::io::Result<(Self::Stream, S)>> + Send>,
    >;

    fn accept(&self, stream: tokio::net::TcpStream, service: S) -> Self::Future {
        let admitted = self.connections.admit(stream);
        let tls = self.tls.clone();
        let wait = self.first_byte;
        Box::pin(async move {
            let counted =
                admitted.ok_or_else(|| std::io::Error::other("too many open connections"))?;
            let mut byte = [0u8; 1];
            match tokio::time::timeout(wait, counted.get_ref().peek(&mut byte)).await {
                Ok(Ok(n)) if n > 0 => {}
                _ => return Err(std::io::Error::other("the client sent nothing in time")),
            }
            match tls {
                None => Ok((tokio_util::either::Either::Left(counted), service)),
                Some(tls) => {
                    let (stream, service) =
                        axum_server::accept::Accept::accept(&tls, counted, service).await?;
                    Ok((tokio_util::either::Either::Right(stream), service))
                }
            }
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_dashboard_is_not_served_in_the_clear_beyond_loopback() {
        let at = |s: &str| s.parse::<std::net::SocketAddr>().unwrap();
        assert!(check_exposure(at("127.0.0.1:8080"), false, false).is_ok());
        assert!(check_exposure(at("[::1]:8080"), false, false).is_ok());
        let e = check_exposure(at("0.0.0.0:8080"), false, false).unwrap_err();
        assert!(e.to_string().contains("without TLS"), "{e}");
        assert!(check_exposure(at("10.0.0.5:443"), false, false).is_err());
        assert!(check_exposure(at("0.0.0.0:8443"), true, false).is_ok());
        assert!(check_exposure(at("0.0.0.0:8080"), false, true).is_ok());
    }

    #[test]
    fn the_vendored_chart_library_is_the_version_the_lock_file_pins() {
        let lock: serde_json::Value =
            serde_json::from_str(include_str!("../web/package-lock.json")).expect("lock");
        let version = lock["packages"]["node_modules/uplot"]["version"]
            .as_str()
            .expect("uplot in the lock");
        let header = UPLOT_JS.lines().next().expect("header");
        assert!(
            header.contains(&format!("(v{version})")),
            "assets/vendor has {header}, the lock pins {version}: run scripts/vendor-web.sh"
        );
        assert!(UPLOT_LICENSE.contains("MIT License"));
        assert!(UPLOT_CSS.contains(".uplot"));
    }
}
