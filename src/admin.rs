//! The dashboard's sign-in: the admin token, presented once to `POST /login`, is exchanged for
//! a random session id in an `HttpOnly`, `SameSite=Strict` cookie, so the page never keeps the
//! token (not in a URL, not in storage) and the browser's `EventSource` is authorised too.
//!
//! Sessions live in memory (a restart signs everyone out), expire after [`SESSION_TTL`], and
//! are bounded ([`MAX_SESSIONS`]; the oldest is forgotten first). Only a SHA-256 of each id is
//! kept.

use std::collections::HashMap;
use std::sync::Mutex;
use std::time::{Duration, Instant};

use sha2::{Digest, Sha256};

/// The cookie's name.
pub const COOKIE: &str = "callbridge_session";
/// How long a sign-in lasts.
pub const SESSION_TTL: Duration = Duration::from_secs(12 * 3600);
/// Sessions kept at most.
pub const MAX_SESSIONS: usize = 1_000;

#[derive(Default)]
pub struct Sessions {
    live: Mutex<HashMap<[u8; 32], Instant>>,
}

fn digest(id: &str) -> [u8; 32] {
    Sha256::digest(id.as_bytes()).into()
}

/// `bytes` random bytes from the operating system, in hex (session ids, outbound nonces).
pub fn random_hex(bytes: usize) -> Result<String, getrandom::Error> {
    let mut buf = vec![0u8; bytes];
    getrandom::fill(&mut buf)?;
    Ok(buf.iter().map(|b| format!("{b:02x}")).collect())
}

impl Sessions {
    /// A new session: its id (256 random bits, hex), to be set as the cookie.
    pub fn create(&self) -> Result<String, getrandom::Error> {
        let id = random_hex(32)?;
        let now = Instant::now();
        let mut live = self.live.lock().unwrap_or_else(|e| e.into_inner());
        live.retain(|_, expires| *expires > now);
        while live.len() >= MAX_SESSIONS {
            let oldest = live.iter().min_by_key(|(_, e)| **e).map(|(k, _)| *k);
            match oldest {
                Some(k) => live.remove(&k),
                None => break,
            };
        }
        live.insert(digest(&id), now + SESSION_TTL);
        Ok(id)
    }

    /// Whether `id` is a session that has not expired.
    pub fn valid(&self, id: &str) -> bool {
        if id.len() != 64 {
            return false;
        }
        let live = self.live.lock().unwrap_or_else(|e| e.into_inner());
        live.get(&digest(id))
            .is_some_and(|expires| *expires > Instant::now())
    }

    pub fn remove(&self, id: &str) {
        let mut live = self.live.lock().unwrap_or_else(|e| e.into_inner());
        live.remove(&digest(id));
    }

    pub fn len(&self) -> usize {
        self.live.lock().unwrap_or_else(|e| e.into_inner()).len()
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }
}

/// The session id in the request's `Cookie` headers, if any.
pub fn session_cookie(headers: &actix_web::http::header::HeaderMap) -> Option<&str> {
    headers
        .get_all(actix_web::http::header::COOKIE)
        .filter_map(|v| v.to_str().ok())
        .flat_map(|v| v.split(';'))
        .filter_map(|pair| pair.trim().split_once('='))
        .find(|(name, _)| *name == COOKIE)
        .map(|(_, value)| value.trim_matches('"'))
}

/// The `Set-Cookie` value for a session (`secure` over HTTPS).
pub fn set_cookie(id: &str, secure: bool) -> String {
    format!(
        "{COOKIE}={id}; HttpOnly; SameSite=Strict; Path=/; Max-Age={}{}",
        SESSION_TTL.as_secs(),
        if secure { "; Secure" } else { "" }
    )
}

/// The `Set-Cookie` value that signs out.
pub fn clear_cookie() -> String {
    format!("{COOKIE}=; HttpOnly; SameSite=Strict; Path=/; Max-Age=0")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn sessions_are_random_checked_removed_and_bounded() {
        let sessions = Sessions::default();
        let a = sessions.create().unwrap();
        let b = sessions.create().unwrap();
        assert_eq!(a.len(), 64);
        assert_ne!(a, b);
        assert!(sessions.valid(&a) && sessions.valid(&b));
        assert!(!sessions.valid(&"0".repeat(64)));
        assert!(!sessions.valid("short"));
        sessions.remove(&a);
        assert!(!sessions.valid(&a));
        for _ in 0..MAX_SESSIONS + 10 {
            sessions.create().unwrap();
        }
        assert_eq!(sessions.len(), MAX_SESSIONS);
        assert!(!sessions.valid(&b), "the oldest was forgotten");
    }

    #[test]
    fn the_session_cookie_is_found_among_others() {
        use actix_web::http::header::{HeaderMap, HeaderValue, COOKIE as H};
        let mut h = HeaderMap::new();
        assert_eq!(session_cookie(&h), None);
        h.insert(
            H,
            HeaderValue::from_static("a=1; callbridge_session=abc ; b=2"),
        );
        assert_eq!(session_cookie(&h), Some("abc"));
        h.insert(H, HeaderValue::from_static("xcallbridge_session=abc"));
        assert_eq!(session_cookie(&h), None);
    }

    #[test]
    fn cookies() {
        let c = set_cookie("ab", false);
        assert!(c.starts_with("callbridge_session=ab; HttpOnly; SameSite=Strict; Path=/"));
        assert!(!c.contains("Secure"));
        assert!(set_cookie("ab", true).ends_with("; Secure"));
        assert!(clear_cookie().contains("Max-Age=0"));
    }
}
