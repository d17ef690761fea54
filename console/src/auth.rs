//! Operator authentication and the headers every response carries.
//!
//! An operator presents the token (`MUI_CONSOLE_TOKEN`) once at `/login` and gets a session:
//! a random id in a browser-session cookie (`HttpOnly`, `SameSite=Strict`, `Secure` with
//! `--secure-cookies`), kept in memory for [`SESSION_TTL`] (a restart logs everyone out).
//! Each session has its own CSRF token, which every form of an action carries and every
//! action checks ([`Operator::check_csrf`]). A script may instead send
//! `Authorization: Bearer <token>` on each request (no cookie, so no CSRF to fear).
//! Every other request gets 401.

use std::collections::HashMap;
use std::sync::Mutex;
use std::time::{Duration, Instant};

use axum::extract::{Request, State};
use axum::http::{header, HeaderMap, HeaderValue, StatusCode};
use axum::middleware::Next;
use axum::response::{IntoResponse, Response};
use axum_extra::extract::cookie::{Cookie, CookieJar, SameSite};
use rand::RngCore;
use subtle::ConstantTimeEq;

use crate::{AppState, Token};

/// The session cookie's name.
pub const COOKIE: &str = "mui_console_session";
/// How long a session lasts after login.
pub const SESSION_TTL: Duration = Duration::from_secs(12 * 3600);

/// The Content-Security-Policy of every response: scripts and styles only from the console
/// itself (no inline script, no `eval`), nothing framed, forms only to the console.
pub const CSP: &str = "default-src 'none'; script-src 'self'; style-src 'self'; img-src 'self'; \
     connect-src 'self'; form-action 'self'; frame-ancestors 'none'; base-uri 'none'";

/// `n` random bytes from the operating system, in hex.
pub fn random_hex(n: usize) -> String {
    let mut bytes = vec![0u8; n];
    rand::rngs::OsRng.fill_bytes(&mut bytes);
    hex::encode(bytes)
}

fn same(a: &str, b: &str) -> bool {
    a.len() == b.len() && bool::from(a.as_bytes().ct_eq(b.as_bytes()))
}

#[derive(Debug)]
struct Session {
    csrf: String,
    expires: Instant,
}

/// The operators' token and the open sessions.
#[derive(Debug)]
pub struct Auth {
    token: Token,
    secure: bool,
    sessions: Mutex<HashMap<String, Session>>,
}

/// Who is asking: an operator with a session (and its CSRF token), or a script that sent
/// the token itself.
#[derive(Debug, Clone)]
pub struct Operator {
    /// The session's CSRF token; `None` for a request authenticated by its bearer token.
    pub csrf: Option<String>,
}

impl Operator {
    /// Who took an action, as the record says it: `console`, or `console (bearer token)`.
    pub fn recorded_as(&self) -> &'static str {
        if self.csrf.is_some() {
            "console"
        } else {
            "console (bearer token)"
        }
    }

    /// Whether an action may go ahead: the form's CSRF token is the session's (a request
    /// with the bearer token needs none).
    pub fn check_csrf(&self, presented: Option<&str>) -> bool {
        match &self.csrf {
            None => true,
            Some(mine) => presented.is_some_and(|p| same(mine, p)),
        }
    }

    /// The CSRF token to put in forms (empty for bearer requests, which need none).
    pub fn csrf_token(&self) -> &str {
        self.csrf.as_deref().unwrap_or("")
    }
}

impl Auth {
    /// Sessions for operators presenting `token`.
    pub fn new(token: Token, secure: bool) -> Self {
        Self {
            token,
            secure,
            sessions: Mutex::new(HashMap::new()),
        }
    }

    fn sessions(&self) -> std::sync::MutexGuard<'_, HashMap<String, Session>> {
        // A panic while holding the lock leaves a map that is still consistent.
        self.sessions
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
    }

    /// Whether `presented` is the operators' token (compared in constant time).
    pub fn token_ok(&self, presented: &str) -> bool {
        same(self.token.expose(), presented.trim())
    }

    /// Opens a session if `presented` is the token; returns its id.
    pub fn login(&self, presented: &str) -> Option<String> {
        if !self.token_ok(presented) {
            return None;
        }
        let id = random_hex(32);
        let now = Instant::now();
        let mut sessions = self.sessions();
        sessions.retain(|_, s| s.expires > now);
        sessions.insert(
            id.clone(),
            Session {
                csrf: random_hex(32),
                expires: now + SESSION_TTL,
            },
        );
        Some(id)
    }

    /// The operator of a live session.
    pub fn session(&self, id: &str) -> Option<Operator> {
        let sessions = self.sessions();
        let s = sessions.get(id)?;
        (s.expires > Instant::now()).then(|| Operator {
            csrf: Some(s.csrf.clone()),
        })
    }

    /// Ends a session.
    pub fn logout(&self, id: &str) {
        self.sessions().remove(id);
    }

    /// The cookie carrying session `id`.
    pub fn cookie(&self, id: String) -> Cookie<'static> {
        Cookie::build((COOKIE, id))
            .path("/")
            .http_only(true)
            .same_site(SameSite::Strict)
            .secure(self.secure)
            .build()
    }

    /// The cookie that removes the session cookie.
    pub fn removal(&self) -> Cookie<'static> {
        Cookie::build((COOKIE, ""))
            .path("/")
            .http_only(true)
            .same_site(SameSite::Strict)
            .secure(self.secure)
            .build()
    }

    /// Who is asking, from the session cookie or a bearer token.
    pub fn operator(&self, headers: &HeaderMap) -> Option<Operator> {
        if let Some(bearer) = headers
            .get(header::AUTHORIZATION)
            .and_then(|v| v.to_str().ok())
            .and_then(|v| v.strip_prefix("Bearer "))
        {
            return self.token_ok(bearer).then_some(Operator { csrf: None });
        }
        let jar = CookieJar::from_headers(headers);
        self.session(jar.get(COOKIE)?.value())
    }
}

/// Lets a request through only with a session or the bearer token (the [`Operator`] goes
/// into its extensions); 401 otherwise, with the login form for a browser.
pub async fn require_operator(
    State(state): State<AppState>,
    mut req: Request,
    next: Next,
) -> Response {
    match state.auth.operator(req.headers()) {
        Some(op) => {
            req.extensions_mut().insert(op);
            next.run(req).await
        }
        None => {
            let json = crate::pages::wants_json(req.headers(), req.uri());
            if json {
                (
                    StatusCode::UNAUTHORIZED,
                    axum::Json(serde_json::json!({
                        "error": "not logged in: POST the operator token to /login, or send Authorization: Bearer <token>"
                    })),
                )
                    .into_response()
            } else {
                (
                    StatusCode::UNAUTHORIZED,
                    crate::views::login(Some("Log in to see this page.")),
                )
                    .into_response()
            }
        }
    }
}

/// Adds the security headers to every response: the [`CSP`], no MIME sniffing, no
/// referrer, no framing; and, unless the handler set its own, `Cache-Control: no-store`
/// (pages hold personal data).
pub async fn security_headers(req: Request, next: Next) -> Response {
    let mut res = next.run(req).await;
    let h = res.headers_mut();
    h.insert(
        header::CONTENT_SECURITY_POLICY,
        HeaderValue::from_static(CSP),
    );
    h.insert(
        header::X_CONTENT_TYPE_OPTIONS,
        HeaderValue::from_static("nosniff"),
    );
    h.insert(
        header::REFERRER_POLICY,
        HeaderValue::from_static("no-referrer"),
    );
    h.insert(header::X_FRAME_OPTIONS, HeaderValue::from_static("DENY"));
    if !h.contains_key(header::CACHE_CONTROL) {
        h.insert(header::CACHE_CONTROL, HeaderValue::from_static("no-store"));
    }
    res
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn sessions_need_the_token_and_carry_their_own_csrf_token() {
        let auth = Auth::new(Token("0123456789abcdef0123".into()), false);
        assert!(auth.login("wrong").is_none());
        assert!(auth.login("0123456789abcdef012").is_none());
        let a = auth.login("0123456789abcdef0123").unwrap();
        let b = auth.login(" 0123456789abcdef0123\n").unwrap();
        assert_ne!(a, b);
        let op_a = auth.session(&a).unwrap();
        let op_b = auth.session(&b).unwrap();
        assert_ne!(op_a.csrf, op_b.csrf);
        assert!(op_a.check_csrf(op_a.csrf.as_deref()));
        assert!(!op_a.check_csrf(op_b.csrf.as_deref()));
        assert!(!op_a.check_csrf(None));
        assert!(!op_a.check_csrf(Some("")));
        auth.logout(&a);
        assert!(auth.session(&a).is_none());
        assert!(auth.session("nonsense").is_none());
        let c = auth.cookie(b).to_string();
        assert!(
            c.contains("HttpOnly") && c.contains("SameSite=Strict"),
            "{c}"
        );
        assert!(!c.contains("Secure"), "{c}");
        let secure = Auth::new(Token("0123456789abcdef0123".into()), true);
        assert!(secure.cookie("x".into()).to_string().contains("Secure"));
    }
}
