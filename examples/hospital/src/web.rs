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
use crate::auth::{self, LoginLimit, LoginLimiter, Tokens};
use crate::infer::Predictor;
use crate::sim::Shared;
use crate::store::{Role, Store};

/// How the dashboard is set up.
#[derive(Debug, Clone)]
pub struct WebConfig {
    /// `DATABASE_URL`.
    pub database_url: String,
    /// The JWT signing secret (`JWT_SECRET` / `JWT_SECRET_FILE`); a random one
    /// per process when unset (tokens then end with the process).
    pub jwt_secret: Option<String>,
    /// Token lifetime.
    pub token_ttl: Duration,
    /// Login attempts.
    pub login_limit: LoginLimit,
    /// Upload limits.
    pub uploads: UploadLimits,
    /// TLS certificate and key (PEM), when the server should speak HTTPS.
    pub tls: Option<(PathBuf, PathBuf)>,
    /// Encryption at rest.
    pub at_rest: Option<AtRest>,
}

impl WebConfig {
    /// From the environment: `DATABASE_URL` (default `sqlite://<default_db>`),
    /// `JWT_SECRET[_FILE]`, `TLS_CERT` + `TLS_KEY`, `FEDCORE_DATA_KEY[_FILE]`.
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
            token_ttl: Duration::from_secs(8 * 3600),
            login_limit: LoginLimit::default(),
            uploads: UploadLimits::default(),
            tls,
            at_rest: AtRest::from_env()?,
        })
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
        tokens: Tokens::new(&secret, config.token_ttl)?,
        limiter: LoginLimiter::new(config.login_limit)?,
        shared,
        predictor,
        at_rest: config.at_rest.clone(),
        uploads: config.uploads,
        decodes: Arc::new(tokio::sync::Semaphore::new(
            config.uploads.max_concurrent_decodes.max(1),
        )),
        tls: config.tls.is_some(),
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

fn asset(content_type: &'static str, body: &'static str) -> Response {
    ([(header::CONTENT_TYPE, content_type)], body).into_response()
}

/// The whole application: API, pages, docs, headers.
pub fn app(state: AppState) -> Router {
    let tls = state.tls;
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
        .fallback(|| async {
            (
                StatusCode::NOT_FOUND,
                axum::Json(api::ErrorBody {
                    error: "not found".into(),
                }),
            )
        })
        .with_state(state)
        .layer(middleware::from_fn(move |req, next| {
            security_headers(tls, req, next)
        }))
}

/// Serves `app` on `addr` until the process ends; HTTPS with rustls when the
/// config names a certificate. Returns the bound address through `bound`.
pub async fn serve(
    app: Router,
    addr: SocketAddr,
    tls: Option<&(PathBuf, PathBuf)>,
    bound: tokio::sync::oneshot::Sender<SocketAddr>,
) -> Result<()> {
    let make = app.into_make_service_with_connect_info::<SocketAddr>();
    match tls {
        None => {
            let listener = tokio::net::TcpListener::bind(addr)
                .await
                .with_context(|| format!("cannot listen on {addr}"))?;
            let _ = bound.send(listener.local_addr()?);
            axum::serve(listener, make).await?;
        }
        Some((cert, key)) => {
            let _ = rustls::crypto::ring::default_provider().install_default();
            let config = axum_server::tls_rustls::RustlsConfig::from_pem_file(cert, key)
                .await
                .with_context(|| {
                    format!("TLS certificate {} / key {}", cert.display(), key.display())
                })?;
            let std_listener = std::net::TcpListener::bind(addr)
                .with_context(|| format!("cannot listen on {addr}"))?;
            let _ = bound.send(std_listener.local_addr()?);
            axum_server::from_tcp_rustls(std_listener, config)?
                .serve(make)
                .await?;
        }
    }
    Ok(())
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
}
