//! Who may do what in the web UI and REST API: roles and what each allows, argon2id
//! password hashes, browser sessions (cookie + CSRF token), API tokens, and the login
//! rate limit.
//!
//! Secrets (session cookies, API tokens) are random; the catalog keeps only their BLAKE3
//! hashes, so a copy of the catalog lets nobody in.

use std::collections::HashMap;
use std::sync::Mutex;
use std::time::{Duration, Instant};

use argon2::{Algorithm, Argon2, Params, Version};
use axum::http::HeaderMap;
use morgana_core::Id;

use crate::catalog::{Catalog, CatalogError, User};

/// The session cookie. `__Host-` makes browsers insist on Secure, Path=/ and no Domain.
pub const SESSION_COOKIE: &str = "__Host-morgana-session";
/// The header htmx requests carry the CSRF token in (forms use the `csrf` field).
pub const CSRF_HEADER: &str = "x-csrf-token";
pub const SESSION_LIFETIME: Duration = Duration::from_secs(12 * 3600);
pub const MIN_PASSWORD_LEN: usize = 10;
pub const MAX_PASSWORD_LEN: usize = 1024;
/// Failed logins per user name within [`LOGIN_WINDOW`] before further tries are refused.
pub const LOGIN_FAILURES_ALLOWED: u32 = 5;
pub const LOGIN_WINDOW: Duration = Duration::from_secs(15 * 60);

#[derive(Debug, thiserror::Error)]
pub enum AuthError {
    #[error(
        "the password is too short: use at least {MIN_PASSWORD_LEN} characters (a few words \
         make a good one)"
    )]
    PasswordTooShort,
    #[error("the password is longer than {MAX_PASSWORD_LEN} bytes: use a shorter one")]
    PasswordTooLong,
    #[error(
        "{0:?} is not a usable user name: use 1 to 64 letters, digits, `.`, `-`, `_` or `@`, \
         starting with a letter or digit"
    )]
    BadUserName(String),
    #[error(
        "{0:?} is not a role: use administrator, image-manager, protection-manager, helpdesk \
         or end-user"
    )]
    BadRole(String),
    #[error("hashing the password failed: {0}")]
    Hash(String),
    #[error(transparent)]
    Catalog(#[from] CatalogError),
}

/// The roles of DESIGN.md. Staff roles use the management UI; end users only the portal.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum Role {
    Administrator,
    ImageManager,
    ProtectionManager,
    Helpdesk,
    EndUser,
}

impl Role {
    pub const ALL: [Role; 5] = [
        Role::Administrator,
        Role::ImageManager,
        Role::ProtectionManager,
        Role::Helpdesk,
        Role::EndUser,
    ];

    pub fn name(self) -> &'static str {
        match self {
            Role::Administrator => "administrator",
            Role::ImageManager => "image-manager",
            Role::ProtectionManager => "protection-manager",
            Role::Helpdesk => "helpdesk",
            Role::EndUser => "end-user",
        }
    }

    pub fn label(self) -> &'static str {
        match self {
            Role::Administrator => "Administrator",
            Role::ImageManager => "Image Manager",
            Role::ProtectionManager => "Protection Manager",
            Role::Helpdesk => "Helpdesk",
            Role::EndUser => "End user",
        }
    }

    pub fn parse(s: &str) -> Option<Role> {
        Role::ALL.into_iter().find(|r| r.name() == s)
    }

    /// Whether this role may do what `p` covers.
    pub fn allows(self, p: Permission) -> bool {
        use Role::*;
        match p {
            Permission::SignedIn => true,
            Permission::ViewFleet => matches!(
                self,
                Administrator | ImageManager | ProtectionManager | Helpdesk
            ),
            Permission::OwnDevices => true,
            Permission::RunJobs => matches!(self, Administrator | ProtectionManager | Helpdesk),
            Permission::ManageProtection => matches!(self, Administrator | ProtectionManager),
            Permission::ManageImages => matches!(self, Administrator | ImageManager),
            Permission::Administer => self == Administrator,
        }
    }

    /// Whether the role sees every device; the others see only the devices they own.
    pub fn sees_all_devices(self) -> bool {
        self.allows(Permission::ViewFleet)
    }
}

impl std::str::FromStr for Role {
    type Err = AuthError;
    fn from_str(s: &str) -> Result<Role, AuthError> {
        Role::parse(s).ok_or_else(|| AuthError::BadRole(s.to_owned()))
    }
}

/// What a route needs.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Permission {
    /// Any signed-in user: their own account.
    SignedIn,
    /// See devices, snapshots, trees, diffs and events: every staff role.
    ViewFleet,
    /// Devices, snapshots and trees of one's own devices (staff: all devices).
    OwnDevices,
    /// Sync now, file and folder restores (jobs that keep the device's system as it is):
    /// Helpdesk, Protection Managers, administrators.
    RunJobs,
    /// Policies, retention, garbage collection, full and system-only restores: Protection
    /// Managers and administrators.
    ManageProtection,
    /// Layers, reference machines, driver library and profiles, reflectors, layer
    /// assignment and apply jobs: Image Managers and administrators.
    ManageImages,
    /// Users, API tokens, enrolment tokens, device owners, nodes, volumes, plugins:
    /// administrators.
    Administer,
}

/// Whether `name` is a user name we accept: it shows up in audit actors (`user:NAME`) and
/// URLs, so it stays plain.
pub fn check_user_name(name: &str) -> Result<(), AuthError> {
    let ok = !name.is_empty()
        && name.len() <= 64
        && name
            .chars()
            .next()
            .is_some_and(|c| c.is_ascii_alphanumeric())
        && name
            .chars()
            .all(|c| c.is_ascii_alphanumeric() || matches!(c, '.' | '-' | '_' | '@'));
    if ok {
        Ok(())
    } else {
        Err(AuthError::BadUserName(name.to_owned()))
    }
}

pub fn check_password(password: &str) -> Result<(), AuthError> {
    if password.len() > MAX_PASSWORD_LEN {
        Err(AuthError::PasswordTooLong)
    } else if password.chars().count() < MIN_PASSWORD_LEN {
        Err(AuthError::PasswordTooShort)
    } else {
        Ok(())
    }
}

/// A password for a new account or a reset: 20 characters from an alphabet without
/// look-alikes, about 100 bits.
pub fn generate_password() -> String {
    const ALPHABET: &[u8] = b"abcdefghjkmnpqrstuvwxyzACDEFGHJKLMNPQRSTUVWXYZ23456789";
    let mut bytes = [0u8; 20];
    crate::random::fill(&mut bytes);
    bytes
        .iter()
        .map(|b| ALPHABET[usize::from(*b) % ALPHABET.len()] as char)
        .collect()
}

// OWASP's argon2id minimum: 19 MiB, 2 passes, 1 lane.
const M_COST: u32 = 19 * 1024;
const T_COST: u32 = 2;
const P_COST: u32 = 1;
const HASH_LEN: usize = 32;

fn argon2(m: u32, t: u32, p: u32) -> Result<Argon2<'static>, AuthError> {
    let params =
        Params::new(m, t, p, Some(HASH_LEN)).map_err(|e| AuthError::Hash(e.to_string()))?;
    Ok(Argon2::new(Algorithm::Argon2id, Version::V0x13, params))
}

/// An argon2id hash of `password` with a fresh salt, as
/// `argon2id$v=19$m=M,t=T,p=P$SALT$HASH` (hex): the parameters travel with the hash, so
/// stronger ones later still verify old hashes.
pub fn hash_password(password: &str) -> Result<String, AuthError> {
    check_password(password)?;
    let mut salt = [0u8; 16];
    crate::random::fill(&mut salt);
    let mut out = [0u8; HASH_LEN];
    argon2(M_COST, T_COST, P_COST)?
        .hash_password_into(password.as_bytes(), &salt, &mut out)
        .map_err(|e| AuthError::Hash(e.to_string()))?;
    Ok(format!(
        "argon2id$v=19$m={M_COST},t={T_COST},p={P_COST}${}${}",
        crate::random::to_hex(&salt),
        crate::random::to_hex(&out)
    ))
}

fn from_hex(s: &str) -> Option<Vec<u8>> {
    if !s.len().is_multiple_of(2) {
        return None;
    }
    (0..s.len())
        .step_by(2)
        .map(|i| u8::from_str_radix(s.get(i..i + 2)?, 16).ok())
        .collect()
}

/// Whether `password` matches `stored`; a malformed stored hash matches nothing.
pub fn verify_password(password: &str, stored: &str) -> bool {
    if password.len() > MAX_PASSWORD_LEN {
        return false;
    }
    let parts: Vec<&str> = stored.split('$').collect();
    let &[alg, "v=19", params, salt, hash] = parts.as_slice() else {
        return false;
    };
    if alg != "argon2id" {
        return false;
    }
    let mut m = None;
    let mut t = None;
    let mut p = None;
    for kv in params.split(',') {
        match kv.split_once('=') {
            Some(("m", v)) => m = v.parse().ok(),
            Some(("t", v)) => t = v.parse().ok(),
            Some(("p", v)) => p = v.parse().ok(),
            _ => return false,
        }
    }
    let (Some(m), Some(t), Some(p), Some(salt), Some(hash)) =
        (m, t, p, from_hex(salt), from_hex(hash))
    else {
        return false;
    };
    let Ok(argon) = argon2(m, t, p) else {
        return false;
    };
    let mut out = vec![0u8; hash.len()];
    if hash.is_empty()
        || argon
            .hash_password_into(password.as_bytes(), &salt, &mut out)
            .is_err()
    {
        return false;
    }
    // Constant time: how much of a guess matched must not show in the answer's timing.
    out.iter().zip(&hash).fold(0u8, |acc, (a, b)| acc | (a ^ b)) == 0
}

/// Checks a login. Disabled users and wrong passwords look alike to the caller, and an
/// unknown name costs a hash too, so timing does not tell which names exist.
pub async fn authenticate(
    catalog: &dyn Catalog,
    name: &str,
    password: &str,
) -> Result<Option<User>, AuthError> {
    let user = catalog.user(name).await?;
    let password = password.to_owned();
    let stored = user.as_ref().map(|u| u.password_hash.clone());
    let ok = tokio::task::spawn_blocking(move || match stored {
        Some(stored) => verify_password(&password, &stored),
        None => {
            let _ = hash_password("a decoy to spend the same time");
            false
        }
    })
    .await
    .unwrap_or(false);
    Ok(user.filter(|u| ok && !u.disabled))
}

/// A new random secret (session cookie or API token) and the hash the catalog keeps.
pub fn new_secret(prefix: &str) -> (String, Id) {
    let secret = format!("{prefix}{}", crate::random::hex(32));
    let hash = Id::of(secret.as_bytes());
    (secret, hash)
}

/// The CSRF token of a session: derived from the cookie's secret, which only the browser
/// holding the cookie (and this server) knows, so nothing more needs storing.
pub fn csrf_token(session_secret: &str) -> String {
    let key = blake3::derive_key("morgana csrf token v1", session_secret.as_bytes());
    crate::random::to_hex(&key[..16])
}

pub fn session_cookie(secret: &str) -> String {
    format!(
        "{SESSION_COOKIE}={secret}; Path=/; HttpOnly; Secure; SameSite=Strict; Max-Age={}",
        SESSION_LIFETIME.as_secs()
    )
}

pub fn clear_session_cookie() -> String {
    format!("{SESSION_COOKIE}=; Path=/; HttpOnly; Secure; SameSite=Strict; Max-Age=0")
}

/// The session secret from the request's cookies.
pub fn session_secret(headers: &HeaderMap) -> Option<String> {
    headers
        .get_all(axum::http::header::COOKIE)
        .iter()
        .filter_map(|v| v.to_str().ok())
        .flat_map(|v| v.split(';'))
        .filter_map(|c| c.trim().split_once('='))
        .find(|(k, _)| *k == SESSION_COOKIE)
        .map(|(_, v)| v.to_owned())
        .filter(|v| !v.is_empty() && v.len() <= 128)
}

/// The API token from `Authorization: Bearer ...`.
pub fn bearer_token(headers: &HeaderMap) -> Option<String> {
    let value = headers
        .get(axum::http::header::AUTHORIZATION)?
        .to_str()
        .ok()?;
    let (scheme, token) = value.split_once(' ')?;
    scheme
        .eq_ignore_ascii_case("bearer")
        .then(|| token.trim().to_owned())
        .filter(|t| !t.is_empty() && t.len() <= 128)
}

/// Refuses logins for a user name after repeated failures, for a while. Per name (not per
/// address): guessing one account's password stays slow even from many addresses.
#[derive(Default)]
pub struct LoginLimiter {
    failures: Mutex<HashMap<String, (u32, Instant)>>,
}

impl LoginLimiter {
    /// `Some(wait)` while logins for `name` are refused.
    pub fn blocked(&self, name: &str) -> Option<Duration> {
        let map = self.failures.lock().unwrap_or_else(|e| e.into_inner());
        let (count, since) = map.get(&name.to_lowercase())?;
        let elapsed = since.elapsed();
        (*count >= LOGIN_FAILURES_ALLOWED && elapsed < LOGIN_WINDOW).then(|| LOGIN_WINDOW - elapsed)
    }

    pub fn failed(&self, name: &str) {
        let mut map = self.failures.lock().unwrap_or_else(|e| e.into_inner());
        // Names nobody tried for a window are forgotten, so random names cannot grow this.
        if map.len() > 10_000 {
            map.retain(|_, (_, since)| since.elapsed() < LOGIN_WINDOW);
        }
        let entry = map
            .entry(name.to_lowercase())
            .or_insert((0, Instant::now()));
        if entry.1.elapsed() >= LOGIN_WINDOW {
            *entry = (0, Instant::now());
        }
        entry.0 += 1;
    }

    pub fn succeeded(&self, name: &str) {
        let mut map = self.failures.lock().unwrap_or_else(|e| e.into_inner());
        map.remove(&name.to_lowercase());
    }
}

/// Creates the first administrator if there are no users at all: `admin`, with the password
/// from `MORGANA_ADMIN_PASSWORD` or a generated one the administrator must change at first
/// login. Returns the generated password, to be shown once.
pub async fn ensure_admin(catalog: &dyn Catalog) -> anyhow::Result<Option<String>> {
    if catalog.user_count().await? > 0 {
        return Ok(None);
    }
    let (password, generated) = match std::env::var("MORGANA_ADMIN_PASSWORD") {
        Ok(p) if !p.is_empty() => (p, false),
        _ => (generate_password(), true),
    };
    let hash = tokio::task::spawn_blocking({
        let password = password.clone();
        move || hash_password(&password)
    })
    .await??;
    match catalog
        .create_user(&User {
            name: "admin".into(),
            role: Role::Administrator,
            password_hash: hash,
            must_change: generated,
            disabled: false,
            created: crate::clock::rfc3339_ms(crate::clock::now_ms()),
        })
        .await
    {
        // Another process made it meanwhile: theirs stands.
        Err(CatalogError::UserExists(_)) => return Ok(None),
        r => r?,
    }
    crate::events::record(
        catalog,
        crate::events::NewEvent::system(
            "user.created",
            crate::events::Severity::Info,
            "first administrator `admin` created",
        ),
    )
    .await;
    Ok(generated.then_some(password))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn passwords_hash_verify_and_refuse() {
        let h = hash_password("correct horse battery").unwrap();
        assert!(h.starts_with("argon2id$v=19$m=19456,t=2,p=1$"), "{h}");
        assert!(verify_password("correct horse battery", &h));
        assert!(!verify_password("correct horse batterY", &h));
        assert_ne!(h, hash_password("correct horse battery").unwrap(), "salted");
        let bad_params = h.replace("p=1", "q=1");
        for broken in [
            "",
            "argon2id$v=19$m=8,t=1,p=1$zz$00",
            "plain",
            bad_params.as_str(),
        ] {
            assert!(
                !verify_password("correct horse battery", broken),
                "{broken}"
            );
        }
        assert!(matches!(
            hash_password("short"),
            Err(AuthError::PasswordTooShort)
        ));
        assert!(check_password(&generate_password()).is_ok());
    }

    #[test]
    fn user_names_and_roles() {
        for ok in ["admin", "ann.smith", "bob@example.com", "x"] {
            check_user_name(ok).unwrap();
        }
        let long = "a".repeat(65);
        for bad in ["", ".hidden", "a b", "a/b", "é", long.as_str()] {
            assert!(check_user_name(bad).is_err(), "{bad}");
        }
        for r in Role::ALL {
            assert_eq!(Role::parse(r.name()), Some(r));
        }
        assert!("root".parse::<Role>().is_err());
    }

    #[test]
    fn cookies_and_bearer_tokens_are_read_exactly() {
        let mut h = HeaderMap::new();
        h.insert(
            "cookie",
            format!("other=1; {SESSION_COOKIE}=abc; x=y")
                .parse()
                .unwrap(),
        );
        assert_eq!(session_secret(&h).as_deref(), Some("abc"));
        h.insert("authorization", "Bearer  tok ".parse().unwrap());
        assert_eq!(bearer_token(&h).as_deref(), Some("tok"));
        h.insert("authorization", "Basic abc".parse().unwrap());
        assert_eq!(bearer_token(&h), None);
        assert_ne!(csrf_token("a"), csrf_token("b"));
    }

    #[test]
    fn the_limiter_blocks_after_repeated_failures_and_forgets_on_success() {
        let l = LoginLimiter::default();
        for _ in 0..LOGIN_FAILURES_ALLOWED - 1 {
            l.failed("Ann");
        }
        assert!(l.blocked("ann").is_none());
        l.failed("ann");
        assert!(l.blocked("ANN").is_some());
        assert!(l.blocked("bob").is_none());
        l.succeeded("ann");
        assert!(l.blocked("ann").is_none());
    }
}
