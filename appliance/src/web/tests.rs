//! The web UI and REST API through the appliance's whole router (agent API included, as
//! `serve` builds it): who may call what, device isolation for end users, CSRF, the login
//! rate limit, the OpenAPI description, browsing and diffs on real stored trees.

use std::collections::BTreeSet;
use std::sync::Arc;

use axum::Router;
use axum::body::Body;
use axum::http::{Request, StatusCode, header};
use morgana_core::Id;
use morgana_core::pack::{BlobKind, Compression, PackBuilder};
use morgana_core::tree::{Content, Entry, Kind, Tree};
use morgana_core::wire::SnapshotInfo;
use tower::ServiceExt;

use crate::api::AppState;
use crate::auth::{self, Role};
use crate::catalog::{Catalog, Device, SqliteCatalog};
use crate::config::DataDir;
use crate::store::PackStore;
use crate::tls::Pki;

use super::ops;

struct Harness {
    _dir: tempfile::TempDir,
    app: Router,
    catalog: Arc<dyn Catalog>,
    store: Arc<PackStore>,
    /// Session secret and API token per role.
    sessions: Vec<(Role, String)>,
    tokens: Vec<(Role, String)>,
    /// Owned by the end user.
    own_device: String,
    /// Owned by nobody.
    other_device: String,
    own_snapshots: Vec<String>,
    other_snapshot: String,
    spare_token_id: i64,
}

fn user_of(role: Role) -> &'static str {
    match role {
        Role::Administrator => "root",
        Role::ImageManager => "imaging",
        Role::ProtectionManager => "protection",
        Role::Helpdesk => "help",
        Role::EndUser => "ann",
    }
}

fn file(name: &str, data: &[u8]) -> Entry {
    Entry {
        name: name.as_bytes().to_vec(),
        kind: Some(Kind::File),
        mode: 0o644,
        size: data.len() as u64,
        content: Content::Inline(data.to_vec()),
        ..Default::default()
    }
}

fn folder(name: &str, id: Id) -> Entry {
    Entry {
        name: name.as_bytes().to_vec(),
        kind: Some(Kind::Dir),
        mode: 0o755,
        content: Content::Tree(id),
        ..Default::default()
    }
}

/// Stores trees in one pack and indexes them.
async fn store_trees(catalog: &Arc<dyn Catalog>, store: &PackStore, trees: &[&Tree]) -> Vec<Id> {
    let mut b = PackBuilder::default();
    let mut ids = Vec::new();
    for t in trees {
        let (id, bytes) = t.seal();
        b.add_stored(
            id,
            BlobKind::Tree,
            Compression::None,
            &bytes,
            bytes.len() as u32,
        );
        ids.push(id);
    }
    let (record, entries) = store.store(b.finish()).unwrap();
    catalog.insert_pack(&record, &entries).await.unwrap();
    ids
}

async fn enrol(catalog: &Arc<dyn Catalog>, hostname: &str) -> String {
    let secret = Id::of(hostname.as_bytes());
    catalog.create_token(secret, 1, i64::MAX).await.unwrap();
    let id = crate::random::hex(8);
    catalog
        .enroll_device(
            secret,
            crate::clock::now_ms(),
            &Device {
                id: id.clone(),
                hostname: hostname.into(),
                cert_fingerprint: Id::of(id.as_bytes()),
                created: crate::clock::rfc3339_ms(crate::clock::now_ms()),
                revoked: false,
            },
        )
        .await
        .unwrap();
    id
}

async fn snapshot(catalog: &Arc<dyn Catalog>, device: &str, root: Id, n: u64) -> String {
    let info = SnapshotInfo {
        id: format!("{:012x}{n:08x}", crate::clock::now_ms()),
        device_id: device.into(),
        root,
        created: crate::clock::rfc3339_ms(crate::clock::now_ms() + n as i64),
        reason: "manual".into(),
        stats: Default::default(),
        pinned: None,
    };
    catalog.insert_snapshot(&info).await.unwrap();
    info.id
}

async fn harness() -> Harness {
    let _ = rustls::crypto::ring::default_provider().install_default();
    let dir = tempfile::tempdir().unwrap();
    let data = DataDir::new(dir.path());
    let pki = Arc::new(Pki::ensure(&data).unwrap());
    let catalog: Arc<dyn Catalog> =
        Arc::new(SqliteCatalog::open(&data.catalog(), true).await.unwrap());
    let store = Arc::new(PackStore::open(&[data.default_volume()]).unwrap());
    let web = super::WebState::new(catalog.clone(), pki.ca_cert_der.to_vec(), data.clone());
    let app = crate::api::router(AppState::new(catalog.clone(), store.clone(), pki))
        .merge(super::router(web));

    let mut sessions = Vec::new();
    let mut tokens = Vec::new();
    for role in Role::ALL {
        let name = user_of(role);
        ops::create_user(
            catalog.as_ref(),
            "test",
            name,
            role.name(),
            Some("a long enough password"),
        )
        .await
        .unwrap();
        let (secret, hash) = auth::new_secret("");
        let now = crate::clock::now_ms();
        catalog
            .create_session(hash, name, now, now + 3_600_000)
            .await
            .unwrap();
        sessions.push((role, secret));
        let (_, token) = ops::issue_api_token(catalog.as_ref(), "test", name, "matrix")
            .await
            .unwrap();
        tokens.push((role, token));
    }
    ops::create_user(
        catalog.as_ref(),
        "test",
        "target",
        "helpdesk",
        Some("a long enough password"),
    )
    .await
    .unwrap();
    let (spare, _) = ops::issue_api_token(catalog.as_ref(), "test", "target", "spare")
        .await
        .unwrap();

    // Two snapshots of the end user's device sharing the `docs` folder, one of another.
    let docs = Tree {
        entries: vec![file("a.txt", b"alpha"), file("b.txt", b"beta")],
    };
    let docs_id = docs.seal().0;
    let old_pics = Tree {
        entries: vec![file("cat.jpg", b"meow")],
    };
    let new_pics = Tree {
        entries: vec![file("cat.jpg", b"MEOW!"), file("dog.jpg", b"woof")],
    };
    let (old_pics_id, new_pics_id) = (old_pics.seal().0, new_pics.seal().0);
    let root1 = Tree {
        entries: vec![
            folder("docs", docs_id),
            file("gone.txt", b"bye"),
            folder("pics", old_pics_id),
        ],
    };
    let root2 = Tree {
        entries: vec![folder("docs", docs_id), folder("pics", new_pics_id)],
    };
    let ids = store_trees(
        &catalog,
        &store,
        &[&docs, &old_pics, &new_pics, &root1, &root2],
    )
    .await;
    let own_device = enrol(&catalog, "ann-laptop").await;
    let other_device = enrol(&catalog, "bob-desktop").await;
    let s1 = snapshot(&catalog, &own_device, ids[3], 1).await;
    let s2 = snapshot(&catalog, &own_device, ids[4], 2).await;
    let other_snapshot = snapshot(&catalog, &other_device, ids[4], 3).await;
    catalog
        .set_device_owner(&own_device, Some("ann"))
        .await
        .unwrap();

    Harness {
        _dir: dir,
        app,
        catalog,
        store,
        sessions,
        tokens,
        own_device,
        other_device,
        own_snapshots: vec![s1, s2],
        other_snapshot,
        spare_token_id: spare.id,
    }
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Who {
    Anonymous,
    As(Role),
}

const EVERYONE: [Who; 6] = [
    Who::Anonymous,
    Who::As(Role::Administrator),
    Who::As(Role::ImageManager),
    Who::As(Role::ProtectionManager),
    Who::As(Role::Helpdesk),
    Who::As(Role::EndUser),
];

struct Answer {
    status: StatusCode,
    location: String,
    body: String,
}

impl Harness {
    fn session(&self, role: Role) -> &str {
        &self.sessions.iter().find(|(r, _)| *r == role).unwrap().1
    }

    fn token(&self, role: Role) -> &str {
        &self.tokens.iter().find(|(r, _)| *r == role).unwrap().1
    }

    /// A UI request as a browser with `who`'s session sends it (with the CSRF token in the
    /// form when `csrf`).
    async fn ui(&self, who: Who, method: &str, path: &str, form: &str, csrf: bool) -> Answer {
        let mut req = Request::builder().method(method).uri(path);
        let mut body = form.to_owned();
        if let Who::As(role) = who {
            let secret = self.session(role);
            req = req.header(header::COOKIE, format!("{}={secret}", auth::SESSION_COOKIE));
            if csrf && method != "GET" {
                if !body.is_empty() {
                    body.push('&');
                }
                body.push_str(&format!("csrf={}", auth::csrf_token(secret)));
            }
        }
        if method != "GET" {
            req = req.header(header::CONTENT_TYPE, "application/x-www-form-urlencoded");
        }
        self.send(req.body(Body::from(body)).unwrap()).await
    }

    async fn api(&self, who: Who, method: &str, path: &str, json: Option<&str>) -> Answer {
        let mut req = Request::builder().method(method).uri(path);
        if let Who::As(role) = who {
            req = req.header(
                header::AUTHORIZATION,
                format!("Bearer {}", self.token(role)),
            );
        }
        let body = match json {
            Some(j) => {
                req = req.header(header::CONTENT_TYPE, "application/json");
                Body::from(j.to_owned())
            }
            None => Body::empty(),
        };
        self.send(req.body(body).unwrap()).await
    }

    async fn send(&self, req: Request<Body>) -> Answer {
        let resp = self.app.clone().oneshot(req).await.unwrap();
        let status = resp.status();
        let location = resp
            .headers()
            .get(header::LOCATION)
            .map(|v| v.to_str().unwrap().to_owned())
            .unwrap_or_default();
        let body = axum::body::to_bytes(resp.into_body(), usize::MAX)
            .await
            .unwrap();
        Answer {
            status,
            location,
            body: String::from_utf8_lossy(&body).into_owned(),
        }
    }
}

// Who may do what, written from the role descriptions of issue 4 (not from
// `auth::Permission`): staff (every role but end users) see devices, snapshots and events;
// only administrators manage users, API tokens, enrolment tokens and device owners;
// anybody signed in manages their own account; end users reach only their own devices.
const STAFF: &[Role] = &[
    Role::Administrator,
    Role::ImageManager,
    Role::ProtectionManager,
    Role::Helpdesk,
];
const ADMIN: &[Role] = &[Role::Administrator];
const ANY: &[Role] = &Role::ALL;

/// Method, path, form body, who may, status when allowed.
type UiCase = (&'static str, String, String, &'static [Role], StatusCode);
/// Method, path, JSON body, who may, status when allowed.
type ApiCase = (
    &'static str,
    String,
    Option<String>,
    &'static [Role],
    StatusCode,
);

#[tokio::test]
async fn every_route_answers_each_role_exactly_as_the_roles_say() {
    let h = harness().await;
    let own = h.own_device.clone();
    let (s1, s2) = (h.own_snapshots[0].clone(), h.own_snapshots[1].clone());
    let spare = h.spare_token_id;

    // (method, path, form body, who may, status when allowed)
    let ui: Vec<UiCase> = vec![
        ("GET", "/".into(), "".into(), STAFF, StatusCode::OK),
        ("GET", "/devices".into(), "".into(), STAFF, StatusCode::OK),
        (
            "GET",
            "/devices/rows?q=ann".into(),
            "".into(),
            STAFF,
            StatusCode::OK,
        ),
        (
            "GET",
            format!("/devices/{own}"),
            "".into(),
            STAFF,
            StatusCode::OK,
        ),
        (
            "GET",
            format!("/devices/{own}/snapshots/{s1}/tree?path=%2Fdocs"),
            "".into(),
            STAFF,
            StatusCode::OK,
        ),
        (
            "GET",
            format!("/devices/{own}/diff?from={s1}&to={s2}"),
            "".into(),
            STAFF,
            StatusCode::OK,
        ),
        ("GET", "/events".into(), "".into(), STAFF, StatusCode::OK),
        (
            "GET",
            "/events/verify".into(),
            "".into(),
            STAFF,
            StatusCode::OK,
        ),
        ("GET", "/events/1".into(), "".into(), STAFF, StatusCode::OK),
        ("GET", "/users".into(), "".into(), ADMIN, StatusCode::OK),
        (
            "POST",
            "/users".into(),
            "name=newbie&role=helpdesk&password=".into(),
            ADMIN,
            StatusCode::OK,
        ),
        (
            "POST",
            "/users/target/role".into(),
            "role=protection-manager".into(),
            ADMIN,
            StatusCode::OK,
        ),
        (
            "POST",
            "/users/target/disable".into(),
            "".into(),
            ADMIN,
            StatusCode::OK,
        ),
        (
            "POST",
            "/users/target/enable".into(),
            "".into(),
            ADMIN,
            StatusCode::OK,
        ),
        (
            "POST",
            "/users/target/password".into(),
            "".into(),
            ADMIN,
            StatusCode::OK,
        ),
        (
            "POST",
            "/users/target/api-tokens".into(),
            "label=script".into(),
            ADMIN,
            StatusCode::OK,
        ),
        (
            "POST",
            format!("/api-tokens/{spare}/revoke"),
            "".into(),
            ADMIN,
            StatusCode::OK,
        ),
        (
            "POST",
            format!("/devices/{own}/owner"),
            "owner=ann".into(),
            ADMIN,
            StatusCode::SEE_OTHER,
        ),
        (
            "GET",
            "/enroll-tokens".into(),
            "".into(),
            ADMIN,
            StatusCode::OK,
        ),
        (
            "POST",
            "/enroll-tokens".into(),
            "uses=2&expires=1h".into(),
            ADMIN,
            StatusCode::OK,
        ),
        // ---- Plugins (issue 5): administrators only. A form that is not a file upload is
        // refused as bad input; plugin 999 does not exist.
        ("GET", "/plugins".into(), "".into(), ADMIN, StatusCode::OK),
        (
            "POST",
            "/plugins".into(),
            "hook=layer-rules".into(),
            ADMIN,
            StatusCode::BAD_REQUEST,
        ),
        (
            "POST",
            "/plugins/999/enable".into(),
            "".into(),
            ADMIN,
            StatusCode::NOT_FOUND,
        ),
        (
            "POST",
            "/plugins/999/disable".into(),
            "".into(),
            ADMIN,
            StatusCode::NOT_FOUND,
        ),
        ("GET", "/account".into(), "".into(), ANY, StatusCode::OK),
        // Wrong current password: allowed to try, refused as bad input.
        (
            "POST",
            "/account/password".into(),
            "current=wrong-password&new=another+long+one&confirm=another+long+one".into(),
            ANY,
            StatusCode::BAD_REQUEST,
        ),
    ];
    let mut tried = 0;
    for (method, path, form, allowed, ok) in &ui {
        for who in EVERYONE {
            let a = h.ui(who, method, path, form, true).await;
            let want = match who {
                Who::Anonymous => StatusCode::SEE_OTHER,
                Who::As(r) if allowed.contains(&r) => *ok,
                Who::As(_) => StatusCode::FORBIDDEN,
            };
            assert_eq!(
                a.status,
                want,
                "UI {method} {path} as {who:?}: {}",
                a.body.chars().take(300).collect::<String>()
            );
            if who == Who::Anonymous {
                assert!(a.location.starts_with("/login"), "{path}: {}", a.location);
            }
            tried += 1;
        }
    }

    let api: Vec<ApiCase> = vec![
        ("GET", "/api/v1/me".into(), None, ANY, StatusCode::OK),
        (
            "PUT",
            "/api/v1/me/password".into(),
            Some(r#"{"current":"wrong-password","new":"another long one"}"#.into()),
            ANY,
            StatusCode::BAD_REQUEST,
        ),
        (
            "GET",
            "/api/v1/dashboard".into(),
            None,
            STAFF,
            StatusCode::OK,
        ),
        ("GET", "/api/v1/devices".into(), None, ANY, StatusCode::OK),
        (
            "GET",
            format!("/api/v1/devices/{own}"),
            None,
            ANY,
            StatusCode::OK,
        ),
        (
            "GET",
            format!("/api/v1/devices/{own}/snapshots"),
            None,
            ANY,
            StatusCode::OK,
        ),
        (
            "GET",
            format!("/api/v1/devices/{own}/snapshots/{s2}/tree?path=/pics"),
            None,
            ANY,
            StatusCode::OK,
        ),
        (
            "GET",
            format!("/api/v1/devices/{own}/diff?from={s1}&to={s2}"),
            None,
            ANY,
            StatusCode::OK,
        ),
        (
            "PUT",
            format!("/api/v1/devices/{own}/owner"),
            Some(r#"{"owner":"ann"}"#.into()),
            ADMIN,
            StatusCode::OK,
        ),
        ("GET", "/api/v1/events".into(), None, STAFF, StatusCode::OK),
        (
            "GET",
            "/api/v1/events/verify".into(),
            None,
            STAFF,
            StatusCode::OK,
        ),
        (
            "GET",
            "/api/v1/events/1".into(),
            None,
            STAFF,
            StatusCode::OK,
        ),
        ("GET", "/api/v1/users".into(), None, ADMIN, StatusCode::OK),
        (
            "POST",
            "/api/v1/users".into(),
            Some(r#"{"name":"api-newbie","role":"end-user"}"#.into()),
            ADMIN,
            StatusCode::CREATED,
        ),
        (
            "PATCH",
            "/api/v1/users/target".into(),
            Some(r#"{"role":"helpdesk","disabled":false}"#.into()),
            ADMIN,
            StatusCode::OK,
        ),
        (
            "POST",
            "/api/v1/users/target/password".into(),
            Some("{}".into()),
            ADMIN,
            StatusCode::OK,
        ),
        (
            "GET",
            "/api/v1/api-tokens".into(),
            None,
            ADMIN,
            StatusCode::OK,
        ),
        (
            "POST",
            "/api/v1/api-tokens".into(),
            Some(r#"{"user":"target","label":"ci"}"#.into()),
            ADMIN,
            StatusCode::CREATED,
        ),
        (
            "DELETE",
            format!("/api/v1/api-tokens/{spare}"),
            None,
            ADMIN,
            StatusCode::NO_CONTENT,
        ),
        (
            "GET",
            "/api/v1/enroll-tokens".into(),
            None,
            ADMIN,
            StatusCode::OK,
        ),
        (
            "POST",
            "/api/v1/enroll-tokens".into(),
            Some(r#"{"uses":3,"expires":"2h"}"#.into()),
            ADMIN,
            StatusCode::CREATED,
        ),
        // ---- Plugins (issue 5): administrators only. `{}` is not a component, so it is
        // refused by the host's validation; plugin 999 does not exist.
        ("GET", "/api/v1/plugins".into(), None, ADMIN, StatusCode::OK),
        (
            "POST",
            "/api/v1/plugins?hook=layer-rules&name=junk".into(),
            Some("{}".into()),
            ADMIN,
            StatusCode::BAD_REQUEST,
        ),
        (
            "POST",
            "/api/v1/plugins/999/enable".into(),
            None,
            ADMIN,
            StatusCode::NOT_FOUND,
        ),
        (
            "POST",
            "/api/v1/plugins/999/disable".into(),
            None,
            ADMIN,
            StatusCode::NOT_FOUND,
        ),
    ];
    for (method, path, json, allowed, ok) in &api {
        for who in EVERYONE {
            let a = h.api(who, method, path, json.as_deref()).await;
            let want = match who {
                Who::Anonymous => StatusCode::UNAUTHORIZED,
                Who::As(r) if allowed.contains(&r) => *ok,
                Who::As(_) => StatusCode::FORBIDDEN,
            };
            assert_eq!(a.status, want, "API {method} {path} as {who:?}: {}", a.body);
            tried += 1;
        }
    }

    // Every route of both tables was tried, and the tables cover every route there is.
    let api_routes: BTreeSet<(String, String)> = crate::rest::table()
        .iter()
        .filter(|r| r.path != "/api/v1/openapi.json")
        .map(|r| (r.method.to_string(), r.path.to_owned()))
        .collect();
    let tried_api: BTreeSet<(String, String)> = api
        .iter()
        .map(|(m, p, ..)| (m.to_string(), route_pattern(p)))
        .collect();
    assert_eq!(api_routes, tried_api, "every API route is in the matrix");
    assert_eq!(tried, (ui.len() + api.len()) * EVERYONE.len());

    // Public: the login page, the API description, the assets.
    for path in [
        "/login".to_owned(),
        "/api/v1/openapi.json".to_owned(),
        super::assets::url(&super::assets::ASSETS.htmx),
        super::assets::url(&super::assets::ASSETS.css),
    ] {
        for who in EVERYONE {
            assert_eq!(
                h.ui(who, "GET", &path, "", false).await.status,
                StatusCode::OK
            );
        }
    }
}

/// `/api/v1/devices/abc/snapshots/s1/tree?path=x` → `/api/v1/devices/{id}/snapshots/{snapshot}/tree`.
fn route_pattern(path: &str) -> String {
    let path = path.split('?').next().unwrap();
    let table = crate::rest::table();
    let parts: Vec<&str> = path.split('/').collect();
    table
        .iter()
        .map(|r| r.path)
        .find(|pattern| {
            let pp: Vec<&str> = pattern.split('/').collect();
            pp.len() == parts.len()
                && pp
                    .iter()
                    .zip(&parts)
                    .all(|(p, x)| p == x || (p.starts_with('{') && p.ends_with('}')))
        })
        .unwrap_or(path)
        .to_owned()
}

#[tokio::test]
async fn an_end_user_reaches_only_their_own_devices() {
    let h = harness().await;
    let end = Who::As(Role::EndUser);
    let (own, other) = (&h.own_device, &h.other_device);
    let s_own = &h.own_snapshots[1];
    let s_other = &h.other_snapshot;
    // Another user's device, by its own id and by mixing ids: never found.
    for path in [
        format!("/api/v1/devices/{other}"),
        format!("/api/v1/devices/{other}/snapshots"),
        format!("/api/v1/devices/{other}/snapshots/{s_other}/tree"),
        format!("/api/v1/devices/{other}/snapshots/{s_own}/tree"),
        format!("/api/v1/devices/{other}/diff?from={s_own}&to={s_other}"),
        // Own device, other device's snapshot: the snapshot must belong to the device.
        format!("/api/v1/devices/{own}/snapshots/{s_other}/tree"),
        format!("/api/v1/devices/{own}/diff?from={s_own}&to={s_other}"),
        "/api/v1/devices/0000000000000000".into(),
        "/api/v1/devices/..%2F..".into(),
    ] {
        let a = h.api(end, "GET", &path, None).await;
        assert_eq!(a.status, StatusCode::NOT_FOUND, "{path}: {}", a.body);
        assert!(!a.body.contains("bob-desktop"), "{path} leaks: {}", a.body);
    }
    // The UI's device pages are for staff: an end user is refused whatever the id.
    for path in [
        format!("/devices/{own}"),
        format!("/devices/{other}"),
        format!("/devices/{other}/snapshots/{s_other}/tree"),
    ] {
        let a = h.ui(end, "GET", &path, "", false).await;
        assert_eq!(a.status, StatusCode::FORBIDDEN, "{path}");
    }
    // Listing and searching show only their own.
    for q in ["", "?q=bob", "?state=protected", "?sort=created&dir=desc"] {
        let a = h
            .api(end, "GET", &format!("/api/v1/devices{q}"), None)
            .await;
        let v: serde_json::Value = serde_json::from_str(&a.body).unwrap();
        let ids: Vec<&str> = v["devices"]
            .as_array()
            .unwrap()
            .iter()
            .map(|d| d["id"].as_str().unwrap())
            .collect();
        assert!(ids.iter().all(|id| id == own), "{q}: {ids:?}");
    }
    // Staff see both.
    let a = h
        .api(Who::As(Role::Helpdesk), "GET", "/api/v1/devices", None)
        .await;
    assert!(a.body.contains(own.as_str()) && a.body.contains(other.as_str()));
}

#[tokio::test]
async fn changing_requests_need_the_csrf_token_and_the_right_credentials() {
    let h = harness().await;
    let admin = Who::As(Role::Administrator);
    let form = "name=sneaky&role=administrator&password=a+long+enough+password";
    // No token, a wrong token, a token of another session: refused, nothing changes.
    let a = h.ui(admin, "POST", "/users", form, false).await;
    assert_eq!(a.status, StatusCode::FORBIDDEN);
    let a = h
        .ui(admin, "POST", "/users", &format!("{form}&csrf=0123"), false)
        .await;
    assert_eq!(a.status, StatusCode::FORBIDDEN);
    let other = auth::csrf_token(h.session(Role::Helpdesk));
    let a = h
        .ui(
            admin,
            "POST",
            "/users",
            &format!("{form}&csrf={other}"),
            false,
        )
        .await;
    assert_eq!(a.status, StatusCode::FORBIDDEN);
    let req = Request::builder()
        .method("POST")
        .uri("/users")
        .header(
            header::COOKIE,
            format!(
                "{}={}",
                auth::SESSION_COOKIE,
                h.session(Role::Administrator)
            ),
        )
        .header(auth::CSRF_HEADER, "wrong")
        .header(header::CONTENT_TYPE, "application/x-www-form-urlencoded")
        .body(Body::from(form))
        .unwrap();
    assert_eq!(h.send(req).await.status, StatusCode::FORBIDDEN);
    assert!(h.catalog.user("sneaky").await.unwrap().is_none());
    // The htmx header works as well as the form field.
    let req = Request::builder()
        .method("POST")
        .uri("/users")
        .header(
            header::COOKIE,
            format!(
                "{}={}",
                auth::SESSION_COOKIE,
                h.session(Role::Administrator)
            ),
        )
        .header(
            auth::CSRF_HEADER,
            auth::csrf_token(h.session(Role::Administrator)),
        )
        .header(header::CONTENT_TYPE, "application/x-www-form-urlencoded")
        .body(Body::from(form))
        .unwrap();
    assert_eq!(h.send(req).await.status, StatusCode::OK);
    assert!(h.catalog.user("sneaky").await.unwrap().is_some());

    // The session cookie does not open the API, an API token does not open the UI.
    let req = Request::builder()
        .uri("/api/v1/users")
        .header(
            header::COOKIE,
            format!(
                "{}={}",
                auth::SESSION_COOKIE,
                h.session(Role::Administrator)
            ),
        )
        .body(Body::empty())
        .unwrap();
    assert_eq!(h.send(req).await.status, StatusCode::UNAUTHORIZED);
    let req = Request::builder()
        .uri("/users")
        .header(
            header::AUTHORIZATION,
            format!("Bearer {}", h.token(Role::Administrator)),
        )
        .body(Body::empty())
        .unwrap();
    assert_eq!(h.send(req).await.status, StatusCode::SEE_OTHER);

    // Every change was audited with its actor.
    let events = h
        .catalog
        .events_page(&Default::default(), None, 500)
        .await
        .unwrap();
    assert!(events.iter().any(|e| e.event.kind == "user.created"
        && e.event.actor == "user:root"
        && e.event.message.contains("sneaky")));
}

#[tokio::test]
async fn login_logout_rate_limit_and_disabled_users() {
    let h = harness().await;
    let login =
        |name: &str, password: &str| format!("name={name}&password={}", password.replace(' ', "+"));
    let a = h
        .ui(
            Who::Anonymous,
            "POST",
            "/login",
            &login("help", "a long enough password"),
            false,
        )
        .await;
    assert_eq!(a.status, StatusCode::SEE_OTHER);
    assert_eq!(a.location, "/");
    // An end user lands on their account page, not the staff dashboard.
    let a = h
        .ui(
            Who::Anonymous,
            "POST",
            "/login",
            &login("ann", "a long enough password"),
            false,
        )
        .await;
    assert_eq!(a.location, "/account");
    // Only local paths are followed after login.
    let a = h
        .ui(
            Who::Anonymous,
            "POST",
            "/login",
            &format!(
                "{}&next=%2F%2Fevil.example",
                login("help", "a long enough password")
            ),
            false,
        )
        .await;
    assert_eq!(a.location, "/");

    for _ in 0..auth::LOGIN_FAILURES_ALLOWED {
        let a = h
            .ui(
                Who::Anonymous,
                "POST",
                "/login",
                &login("root", "not the password"),
                false,
            )
            .await;
        assert_eq!(a.status, StatusCode::UNAUTHORIZED);
    }
    // Now even the right password waits.
    let a = h
        .ui(
            Who::Anonymous,
            "POST",
            "/login",
            &login("root", "a long enough password"),
            false,
        )
        .await;
    assert_eq!(a.status, StatusCode::TOO_MANY_REQUESTS, "{}", a.body);
    // Other names are not affected.
    let a = h
        .ui(
            Who::Anonymous,
            "POST",
            "/login",
            &login("imaging", "a long enough password"),
            false,
        )
        .await;
    assert_eq!(a.status, StatusCode::SEE_OTHER);

    // Logout ends the session.
    let help = Who::As(Role::Helpdesk);
    assert_eq!(
        h.ui(help, "GET", "/devices", "", false).await.status,
        StatusCode::OK
    );
    assert_eq!(
        h.ui(help, "POST", "/logout", "", true).await.status,
        StatusCode::SEE_OTHER
    );
    assert_eq!(
        h.ui(help, "GET", "/devices", "", false).await.status,
        StatusCode::SEE_OTHER
    );

    // Disabling a user shuts out their session and API token at once.
    let prot = Who::As(Role::ProtectionManager);
    ops::set_disabled(h.catalog.as_ref(), "test", "protection", true)
        .await
        .unwrap();
    assert_eq!(
        h.ui(prot, "GET", "/", "", false).await.status,
        StatusCode::SEE_OTHER
    );
    assert_eq!(
        h.api(prot, "GET", "/api/v1/me", None).await.status,
        StatusCode::UNAUTHORIZED
    );
    // And the last enabled administrator cannot be demoted or disabled.
    let e = ops::set_role(h.catalog.as_ref(), "test", "root", "helpdesk")
        .await
        .unwrap_err();
    assert_eq!(e.status(), StatusCode::CONFLICT, "{e}");
    let e = ops::set_disabled(h.catalog.as_ref(), "test", "root", true)
        .await
        .unwrap_err();
    assert_eq!(e.status(), StatusCode::CONFLICT, "{e}");
}

#[tokio::test]
async fn a_generated_password_must_be_changed_first() {
    let h = harness().await;
    let generated = ops::reset_password(h.catalog.as_ref(), "test", "help", None)
        .await
        .unwrap()
        .unwrap();
    let a = h
        .ui(
            Who::Anonymous,
            "POST",
            "/login",
            &format!("name=help&password={generated}"),
            false,
        )
        .await;
    assert_eq!(a.location, "/account?must_change=1");
    let user = h.catalog.user("help").await.unwrap().unwrap();
    assert!(user.must_change);
    // A fresh session of that user is sent to the account page from everywhere else.
    let (secret, hash) = auth::new_secret("");
    let now = crate::clock::now_ms();
    h.catalog
        .create_session(hash, "help", now, now + 60_000)
        .await
        .unwrap();
    let req = |path: &str| {
        Request::builder()
            .uri(path)
            .header(header::COOKIE, format!("{}={secret}", auth::SESSION_COOKIE))
            .body(Body::empty())
            .unwrap()
    };
    let a = h.send(req("/devices")).await;
    assert_eq!(
        (a.status, a.location.as_str()),
        (StatusCode::SEE_OTHER, "/account?must_change=1")
    );
    assert_eq!(h.send(req("/account")).await.status, StatusCode::OK);
    let body = format!(
        "current={generated}&new=my+own+password&confirm=my+own+password&csrf={}",
        auth::csrf_token(&secret)
    );
    let a = h
        .send(
            Request::builder()
                .method("POST")
                .uri("/account/password")
                .header(header::COOKIE, format!("{}={secret}", auth::SESSION_COOKIE))
                .header(header::CONTENT_TYPE, "application/x-www-form-urlencoded")
                .body(Body::from(body))
                .unwrap(),
        )
        .await;
    assert_eq!(a.status, StatusCode::SEE_OTHER, "{}", a.body);
    let user = h.catalog.user("help").await.unwrap().unwrap();
    assert!(!user.must_change && auth::verify_password("my own password", &user.password_hash));
    // The old session ended with the change.
    assert_eq!(h.send(req("/account")).await.status, StatusCode::SEE_OTHER);
}

#[tokio::test]
async fn the_openapi_description_lists_exactly_the_routes() {
    let doc: serde_json::Value = serde_json::from_str(crate::rest::OPENAPI).unwrap();
    assert!(doc["openapi"].as_str().unwrap().starts_with("3."));
    let mut described = BTreeSet::new();
    for (path, item) in doc["paths"].as_object().unwrap() {
        for method in item.as_object().unwrap().keys() {
            described.insert((method.to_uppercase(), path.clone()));
        }
    }
    let routed: BTreeSet<(String, String)> = crate::rest::table()
        .iter()
        .map(|r| (r.method.to_string(), r.path.to_owned()))
        .collect();
    assert_eq!(described, routed);

    // And the router answers each described route (not the fallback's "no such API path").
    let h = harness().await;
    for (method, path) in &described {
        let concrete = path
            .replace("{id}", &h.own_device)
            .replace("{snapshot}", &h.own_snapshots[0])
            .replace("{seq}", "1")
            .replace("{name}", "target");
        let a = h
            .api(Who::As(Role::Administrator), method, &concrete, Some("{}"))
            .await;
        assert!(
            !a.body.contains("no such API path"),
            "{method} {path}: {} {}",
            a.status,
            a.body
        );
    }
}

#[tokio::test]
async fn browse_and_diff_read_only_what_changed() {
    let h = harness().await;
    let snaps = ops::snapshots(h.catalog.as_ref(), &h.own_device)
        .await
        .unwrap();
    let (new, old) = (&snaps[0], &snaps[1]);
    let diff = super::browse::diff(h.catalog.as_ref(), old.root, new.root)
        .await
        .unwrap();
    let got: Vec<(super::browse::ChangeKind, &str)> = diff
        .changes
        .iter()
        .map(|c| (c.kind, c.path.as_str()))
        .collect();
    use super::browse::ChangeKind::*;
    assert_eq!(
        got,
        vec![
            (Removed, "/gone.txt"),
            (Modified, "/pics/cat.jpg"),
            (Added, "/pics/dog.jpg"),
        ]
    );
    // Roots and pics read; docs has the same id on both sides and is skipped unread.
    assert_eq!((diff.trees_read, diff.subtrees_skipped), (4, 1));

    let docs = super::browse::folder(h.catalog.as_ref(), new.root, "/docs/")
        .await
        .unwrap();
    assert_eq!(docs.entries.len(), 2);
    for bad in ["/nope", "/docs/a.txt", "/docs/../../etc"] {
        assert!(
            super::browse::folder(h.catalog.as_ref(), new.root, bad)
                .await
                .is_err(),
            "{bad}"
        );
    }
    let _ = &h.store;

    // The UI shows the tree and the diff.
    let help = Who::As(Role::Helpdesk);
    let a = h
        .ui(
            help,
            "GET",
            &format!(
                "/devices/{}/snapshots/{}/tree?path=%2Fdocs",
                h.own_device, new.id
            ),
            "",
            false,
        )
        .await;
    assert!(
        a.body.contains("a.txt") && a.body.contains("b.txt"),
        "{}",
        a.body
    );
    let a = h
        .ui(
            help,
            "GET",
            &format!(
                "/devices/{}/diff?from={}&to={}",
                h.own_device, old.id, new.id
            ),
            "",
            false,
        )
        .await;
    assert!(a.body.contains("/pics/dog.jpg") && a.body.contains("1 unchanged folders skipped"));
}

#[tokio::test]
async fn the_devices_page_filters_sorts_and_pages() {
    let h = harness().await;
    for i in 0..7 {
        enrol(&h.catalog, &format!("lab-{i:02}")).await;
    }
    let help = Who::As(Role::Helpdesk);
    let a = h.ui(help, "GET", "/devices?q=lab&limit=3", "", false).await;
    assert_eq!(a.status, StatusCode::OK);
    assert!(a.body.contains("lab-00") && a.body.contains("lab-02") && !a.body.contains("lab-03"));
    assert!(!a.body.contains("ann-laptop"));
    // Follow the next links through the htmx partial: every lab device once.
    let mut seen = Vec::new();
    let mut next = "/devices/rows?q=lab&limit=3".to_owned();
    loop {
        let a = h.ui(help, "GET", &next, "", false).await;
        assert!(
            a.body.trim_start().starts_with("<tbody"),
            "a fragment: {}",
            a.body
        );
        for i in 0..7 {
            if a.body.contains(&format!(">lab-{i:02}<")) {
                seen.push(i);
            }
        }
        let Some(at) = a.body.find("id=\"next-page\" href=\"/devices?") else {
            break;
        };
        let rest = &a.body[at + "id=\"next-page\" href=\"/devices?".len()..];
        let query = &rest[..rest.find('"').unwrap()];
        // As a browser reads the attribute: HTML entities for `&` decoded.
        next = format!(
            "/devices/rows?{}",
            query.replace("&#38;", "&").replace("&amp;", "&")
        );
    }
    assert_eq!(seen, (0..7).collect::<Vec<_>>());
    // Filters: the never-synced lab devices, none protected.
    let a = h
        .ui(
            help,
            "GET",
            "/devices/rows?q=lab&state=protected",
            "",
            false,
        )
        .await;
    assert!(a.body.contains("No device matches"), "{}", a.body);
    let a = h
        .ui(help, "GET", "/devices/rows?state=bogus", "", false)
        .await;
    assert_eq!(a.status, StatusCode::BAD_REQUEST);
}

#[tokio::test]
async fn a_plugin_upload_is_refused_with_the_hosts_words_and_nothing_is_stored() {
    let h = harness().await;
    let junk = b"\0asm not really";
    // What `morgana plugin add` prints after "refusing FILE: ".
    let host = morgana_core::plugin::host::PluginHost::new(
        None,
        morgana_core::plugin::host::Limits::default(),
    )
    .unwrap();
    let want = host
        .load("junk", morgana_core::plugin::Hook::LayerRules, junk)
        .err()
        .unwrap()
        .to_string();
    let req = Request::builder()
        .method("POST")
        .uri("/api/v1/plugins?hook=layer-rules&name=junk")
        .header(
            header::AUTHORIZATION,
            format!("Bearer {}", h.token(Role::Administrator)),
        )
        .header(header::CONTENT_TYPE, "application/wasm")
        .body(Body::from(junk.to_vec()))
        .unwrap();
    let a = h.send(req).await;
    assert_eq!(a.status, StatusCode::BAD_REQUEST, "{}", a.body);
    let error: serde_json::Value = serde_json::from_str(&a.body).unwrap();
    assert_eq!(error["error"], want.as_str());

    let a = h
        .api(
            Who::As(Role::Administrator),
            "POST",
            "/api/v1/plugins?hook=no-such-hook&name=x",
            Some("x"),
        )
        .await;
    assert_eq!(a.status, StatusCode::BAD_REQUEST);
    assert!(
        a.body
            .contains("driver-matcher, layer-rules, reflector-selector"),
        "{}",
        a.body
    );

    let list = h
        .api(Who::As(Role::Administrator), "GET", "/api/v1/plugins", None)
        .await;
    assert_eq!(list.body, "[]");
    assert!(h.catalog.plugins().await.unwrap().is_empty());
}
