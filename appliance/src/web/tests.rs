//! The web UI and REST API through the appliance's whole router (agent API included, as
//! `serve` builds it): who may call what, device isolation for end users, CSRF, the login
//! rate limit, the OpenAPI description, browsing and diffs on real stored trees.

use std::collections::BTreeSet;
use std::sync::Arc;

use axum::Router;
use axum::body::Body;
use axum::http::{Request, StatusCode, header};
use morgana_core::Id;
use morgana_core::control::JobKind;
use morgana_core::pack::{BlobKind, Compression, PackBuilder};
use morgana_core::tree::{Content, Entry, Kind, Tree};
use morgana_core::wire::SnapshotInfo;
use tower::ServiceExt;

use crate::api::AppState;
use crate::auth::{self, Role};
use crate::catalog::{Catalog, Device, LayerRecord, SqliteCatalog};
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
    let web = super::WebState::new(
        catalog.clone(),
        pki.ca_cert_der.to_vec(),
        data.clone(),
        store.clone(),
        Arc::new(crate::hooks::Hooks::new(catalog.clone(), data.clone())),
    );
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
/// Sync now and file/folder restores.
const RUN_JOBS: &[Role] = &[Role::Administrator, Role::ProtectionManager, Role::Helpdesk];
/// Layers, reference machines, drivers.
const IMAGES: &[Role] = &[Role::Administrator, Role::ImageManager];
/// Policies, retention, full and system-only reverts.
const PROTECTION: &[Role] = &[Role::Administrator, Role::ProtectionManager];
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
    let mut ui: Vec<UiCase> = vec![
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
        ("GET", "/images".into(), "".into(), IMAGES, StatusCode::OK),
        (
            "GET",
            "/reflectors".into(),
            "".into(),
            IMAGES,
            StatusCode::OK,
        ),
        (
            "GET",
            format!("/reflectors/confirm?device={own}&port=9000&site=lyon"),
            "".into(),
            IMAGES,
            StatusCode::OK,
        ),
        (
            "POST",
            "/reflectors".into(),
            format!("device={own}&port=9000&site=lyon"),
            IMAGES,
            StatusCode::SEE_OTHER,
        ),
        (
            "GET",
            format!("/reflectors/{own}/disable"),
            "".into(),
            IMAGES,
            StatusCode::OK,
        ),
        (
            "POST",
            format!("/reflectors/{own}/disable"),
            "".into(),
            IMAGES,
            StatusCode::SEE_OTHER,
        ),
        ("GET", "/nodes".into(), "".into(), ADMIN, StatusCode::OK),
        (
            "GET",
            "/policies".into(),
            "".into(),
            PROTECTION,
            StatusCode::OK,
        ),
        // A sync every second is refused: allowed to try, refused as bad input.
        (
            "POST",
            "/policies".into(),
            "name=lab&toml=sync_interval+%3D+%221s%22".into(),
            PROTECTION,
            StatusCode::BAD_REQUEST,
        ),
        (
            "GET",
            "/policies/default".into(),
            "".into(),
            PROTECTION,
            StatusCode::OK,
        ),
        (
            "POST",
            "/policies/default".into(),
            "toml=".into(),
            PROTECTION,
            StatusCode::SEE_OTHER,
        ),
        (
            "POST",
            "/policies/default/dry-run".into(),
            "toml=".into(),
            PROTECTION,
            StatusCode::OK,
        ),
        (
            "POST",
            "/policies/default/devices".into(),
            format!("devices={own}"),
            PROTECTION,
            StatusCode::SEE_OTHER,
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
    // Jobs, restores and the portal switch (issue 4, second slice).
    let job = crate::jobs::queue(h.catalog.as_ref(), &own, JobKind::Sync, "test")
        .await
        .unwrap()
        .id;
    let restore = format!("snapshot={s2}&scope=paths&path=%2Fdocs&to=");
    ui.extend::<Vec<UiCase>>(vec![
        (
            "POST",
            format!("/devices/{own}/sync"),
            "".into(),
            RUN_JOBS,
            StatusCode::SEE_OTHER,
        ),
        (
            "GET",
            format!("/devices/{own}/restore?snapshot={s2}&path=%2Fdocs"),
            "".into(),
            RUN_JOBS,
            StatusCode::OK,
        ),
        // Without `confirmed`: the confirmation page, nothing queued.
        (
            "POST",
            format!("/devices/{own}/restore"),
            restore.clone(),
            RUN_JOBS,
            StatusCode::OK,
        ),
        (
            "POST",
            format!("/devices/{own}/restore"),
            format!("{restore}&confirmed=yes"),
            RUN_JOBS,
            StatusCode::SEE_OTHER,
        ),
        (
            "POST",
            format!("/devices/{own}/restore"),
            format!("snapshot={s2}&scope=system-only"),
            PROTECTION,
            StatusCode::OK,
        ),
        (
            "POST",
            format!("/devices/{own}/restore"),
            format!("snapshot={s2}&scope=full&confirmed=yes"),
            PROTECTION,
            StatusCode::SEE_OTHER,
        ),
        ("GET", "/jobs".into(), "".into(), STAFF, StatusCode::OK),
        (
            "GET",
            format!("/jobs?device={own}"),
            "".into(),
            STAFF,
            StatusCode::OK,
        ),
        (
            "GET",
            format!("/jobs/{job}"),
            "".into(),
            STAFF,
            StatusCode::OK,
        ),
        (
            "GET",
            format!("/jobs/{job}/progress"),
            "".into(),
            STAFF,
            StatusCode::OK,
        ),
        (
            "POST",
            format!("/devices/{own}/portal"),
            "enabled=true".into(),
            ADMIN,
            StatusCode::SEE_OTHER,
        ),
        ("GET", "/portal".into(), "".into(), ANY, StatusCode::OK),
        (
            "GET",
            "/portal/search?q=cat".into(),
            "".into(),
            ANY,
            StatusCode::OK,
        ),
    ]);
    // Image management (issue 6): image managers and administrators. The end user's device
    // is a reference machine with a base layer `matrix-base` applied, so rollbacks have
    // something to return to; captures and assignments here really run.
    let (layer_job, _) = image_fixture(&h, &own, s2.as_str()).await;
    let other = h.other_device.clone();
    let profile = "toml=all+%3D+%7B+vendor+%3D+%22LENOVO%22+%7D%0Asets+%3D+%5B%22nic%22%5D";
    ui.extend::<Vec<UiCase>>(vec![
        (
            "POST",
            "/images/references".into(),
            format!("device={other}&on=true"),
            IMAGES,
            StatusCode::SEE_OTHER,
        ),
        (
            "GET",
            format!("/images/capture?device={own}&kind=base"),
            "".into(),
            IMAGES,
            StatusCode::OK,
        ),
        // Without `confirmed`: the confirmation page, nothing captured.
        (
            "POST",
            "/images/capture".into(),
            format!("device={own}&kind=base&name=ui-base&snapshot={s2}"),
            IMAGES,
            StatusCode::OK,
        ),
        (
            "POST",
            "/images/capture".into(),
            format!("device={own}&kind=base&name=ui-base&snapshot={s2}&confirmed=yes"),
            IMAGES,
            StatusCode::OK,
        ),
        (
            "GET",
            format!("/images/assign?device={own}"),
            "".into(),
            IMAGES,
            StatusCode::OK,
        ),
        (
            "POST",
            "/images/assign".into(),
            format!("devices={own}&base=matrix-base"),
            IMAGES,
            StatusCode::OK,
        ),
        (
            "POST",
            "/images/assign".into(),
            format!("devices={own}&base=matrix-base&confirmed=yes"),
            IMAGES,
            StatusCode::SEE_OTHER,
        ),
        (
            "GET",
            format!("/images/deployment?jobs={layer_job}"),
            "".into(),
            IMAGES,
            StatusCode::OK,
        ),
        (
            "GET",
            format!("/images/deployment/progress?jobs={layer_job}"),
            "".into(),
            IMAGES,
            StatusCode::OK,
        ),
        (
            "GET",
            format!("/devices/{own}/rollback"),
            "".into(),
            IMAGES,
            StatusCode::OK,
        ),
        (
            "POST",
            format!("/devices/{own}/rollback"),
            "".into(),
            IMAGES,
            StatusCode::SEE_OTHER,
        ),
        (
            "POST",
            "/images/groups".into(),
            format!("name=lab&devices={own}+{other}"),
            IMAGES,
            StatusCode::SEE_OTHER,
        ),
        (
            "GET",
            "/images/driver-profiles?name=lenovo".into(),
            "".into(),
            IMAGES,
            StatusCode::OK,
        ),
        (
            "POST",
            "/images/driver-profiles/preview".into(),
            format!("name=lenovo&{profile}"),
            IMAGES,
            StatusCode::OK,
        ),
        // Driver set `nic` comes from the API's import below, so the UI's save is refused:
        // allowed to try, refused as bad input.
        (
            "POST",
            "/images/driver-profiles".into(),
            format!("name=lenovo&{profile}"),
            IMAGES,
            StatusCode::BAD_REQUEST,
        ),
        // Not a file upload: allowed to try, refused as bad input.
        (
            "POST",
            "/images/driver-sets".into(),
            "name=nic".into(),
            IMAGES,
            StatusCode::BAD_REQUEST,
        ),
        // No inventory reported, so nothing can match: refused as bad input.
        (
            "POST",
            format!("/devices/{own}/drivers"),
            "".into(),
            IMAGES,
            StatusCode::BAD_REQUEST,
        ),
    ]);
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

    let mut api: Vec<ApiCase> = vec![
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
        (
            "GET",
            "/api/v1/policies".into(),
            None,
            PROTECTION,
            StatusCode::OK,
        ),
        (
            "GET",
            "/api/v1/policies/default".into(),
            None,
            PROTECTION,
            StatusCode::OK,
        ),
        (
            "PUT",
            "/api/v1/policies/default".into(),
            Some(r#"{"toml":""}"#.into()),
            PROTECTION,
            StatusCode::OK,
        ),
        (
            "POST",
            "/api/v1/policies/default/dry-run".into(),
            Some(r#"{"toml":"unprotected = { rules = [\"/docs\"] }"}"#.into()),
            PROTECTION,
            StatusCode::OK,
        ),
        (
            "POST",
            "/api/v1/policies/default/devices".into(),
            Some(format!(r#"{{"devices":["{own}"]}}"#)),
            PROTECTION,
            StatusCode::OK,
        ),
        // ---- Plugins (issue 5): administrators only. `{}` is not a component, so it is
        // refused by the host's validation; plugin 999 does not exist.
        ("GET", "/api/v1/plugins".into(), None, ADMIN, StatusCode::OK),
        ("GET", "/api/v1/nodes".into(), None, ADMIN, StatusCode::OK),
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
    // Jobs and the portal switch (issue 4, second slice).
    api.extend::<Vec<ApiCase>>(vec![
        (
            "POST",
            format!("/api/v1/devices/{own}/jobs"),
            Some(r#"{"type":"sync"}"#.into()),
            RUN_JOBS,
            StatusCode::CREATED,
        ),
        (
            "POST",
            format!("/api/v1/devices/{own}/jobs"),
            Some(format!(
                r#"{{"type":"restore","snapshot":"{s2}","paths":["/docs"],"to":"/srv/x"}}"#
            )),
            RUN_JOBS,
            StatusCode::CREATED,
        ),
        (
            "POST",
            format!("/api/v1/devices/{own}/jobs"),
            Some(format!(
                r#"{{"type":"restore","snapshot":"{s2}","scope":"full"}}"#
            )),
            PROTECTION,
            StatusCode::CREATED,
        ),
        ("GET", "/api/v1/jobs".into(), None, STAFF, StatusCode::OK),
        (
            "GET",
            format!("/api/v1/jobs/{job}"),
            None,
            STAFF,
            StatusCode::OK,
        ),
        (
            "PUT",
            format!("/api/v1/devices/{own}/portal"),
            Some(r#"{"enabled":true}"#.into()),
            ADMIN,
            StatusCode::OK,
        ),
    ]);
    let tar = String::from_utf8(driver_tar(&[("e1000e/e1000e.ko", b"module")])).unwrap();
    api.extend::<Vec<ApiCase>>(vec![
        (
            "PUT",
            format!("/api/v1/devices/{other}/reference"),
            Some(r#"{"reference":true}"#.into()),
            IMAGES,
            StatusCode::OK,
        ),
        ("GET", "/api/v1/layers".into(), None, IMAGES, StatusCode::OK),
        (
            "GET",
            "/api/v1/reflectors".into(),
            None,
            IMAGES,
            StatusCode::OK,
        ),
        (
            "PUT",
            format!("/api/v1/devices/{own}/reflector"),
            Some(r#"{"enabled":true,"port":9000,"site":"lyon"}"#.into()),
            IMAGES,
            StatusCode::OK,
        ),
        (
            "POST",
            "/api/v1/layers".into(),
            Some(format!(
                r#"{{"kind":"base","name":"api-base","device":"{own}","notes":"from the API"}}"#
            )),
            IMAGES,
            StatusCode::CREATED,
        ),
        (
            "POST",
            "/api/v1/assignments/dry-run".into(),
            Some(format!(r#"{{"devices":["{own}"],"base":"matrix-base"}}"#)),
            IMAGES,
            StatusCode::OK,
        ),
        (
            "POST",
            "/api/v1/assignments".into(),
            Some(
                r#"{"groups":["lab"],"base":"matrix-base:1","do_not_override":["/docs"]}"#
                    .to_string(),
            ),
            IMAGES,
            StatusCode::CREATED,
        ),
        (
            "POST",
            format!("/api/v1/devices/{own}/rollback"),
            None,
            IMAGES,
            StatusCode::CREATED,
        ),
        ("GET", "/api/v1/groups".into(), None, IMAGES, StatusCode::OK),
        (
            "PUT",
            "/api/v1/groups/lab".into(),
            Some(format!(r#"{{"devices":["{own}"]}}"#)),
            IMAGES,
            StatusCode::OK,
        ),
        (
            "POST",
            "/api/v1/driver-sets?name=nic".into(),
            Some(tar),
            IMAGES,
            StatusCode::CREATED,
        ),
        (
            "GET",
            "/api/v1/driver-profiles".into(),
            None,
            IMAGES,
            StatusCode::OK,
        ),
        (
            "PUT",
            "/api/v1/driver-profiles/lenovo".into(),
            Some(r#"{"toml":"all = { vendor = \"LENOVO\" }\nsets = [\"nic\"]"}"#.into()),
            IMAGES,
            StatusCode::OK,
        ),
        (
            "POST",
            "/api/v1/driver-profiles/lenovo/preview".into(),
            Some(r#"{"toml":"all = { vendor = \"LENOVO\" }\nsets = [\"nic\"]"}"#.into()),
            IMAGES,
            StatusCode::OK,
        ),
        (
            "POST",
            format!("/api/v1/devices/{own}/drivers"),
            None,
            IMAGES,
            StatusCode::BAD_REQUEST,
        ),
    ]);
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

    // Portal pages of one device: only its owner, whatever the role; to everybody else the
    // device does not exist.
    let portal_paths = [
        format!("/portal/devices/{own}"),
        format!("/portal/devices/{own}/snapshots/{s2}/tree?path=%2Fdocs"),
        format!("/portal/devices/{own}/snapshots/{s2}/file?path=%2Fdocs%2Fa.txt"),
        format!("/portal/devices/{own}/snapshots/{s2}/zip?path=%2Fdocs"),
    ];
    for path in &portal_paths {
        for who in EVERYONE {
            let a = h.ui(who, "GET", path, "", false).await;
            let want = match who {
                Who::Anonymous => StatusCode::SEE_OTHER,
                Who::As(Role::EndUser) => StatusCode::OK,
                Who::As(_) => StatusCode::NOT_FOUND,
            };
            assert_eq!(a.status, want, "UI GET {path} as {who:?}");
        }
    }

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

/// Makes `device` a reference machine, captures base layer `matrix-base` from `snapshot`
/// and records it as applied by a job, after a pre-layer-update snapshot: what a device
/// looks like after a successful apply. Returns the apply job's id and the layer.
async fn image_fixture(h: &Harness, device: &str, snapshot: &str) -> (String, LayerRecord) {
    let catalog = h.catalog.as_ref();
    crate::layers::set_reference(catalog, device, true, "test")
        .await
        .unwrap();
    let data = DataDir::new(h._dir.path());
    let hooks = crate::hooks::Hooks::new(h.catalog.clone(), data);
    let env = crate::layers::Env {
        catalog: &h.catalog,
        store: &h.store,
        hooks: &hooks,
    };
    let d = crate::layers::reference_machine(catalog, device)
        .await
        .unwrap();
    let s = catalog.snapshot(snapshot).await.unwrap().unwrap();
    let layer = crate::layers::capture_base(
        &env,
        &crate::layers::Request {
            name: "matrix-base",
            notes: "",
            actor: "test",
            device: &d,
        },
        &s,
    )
    .await
    .unwrap();
    let a = crate::assign::assignment(catalog, "matrix-base", &[], &[])
        .await
        .unwrap();
    let ids = vec![device.to_owned()];
    let plans = crate::assign::dry_runs(catalog, &ids, &a)
        .await
        .unwrap()
        .into_iter()
        .map(|(p, _)| p)
        .collect::<Vec<_>>();
    let job = plans[0].job.clone();
    let queued = crate::assign::apply(catalog, &hooks, &ids, &a, plans, "test")
        .await
        .unwrap();
    let mut pre = s.clone();
    pre.id = format!("{}ff", s.id);
    pre.reason = "pre-layer-update".into();
    catalog.insert_snapshot(&pre).await.unwrap();
    catalog
        .record_applied(device, &queued[0].id, &job, "2026-01-01T00:00:00.000Z")
        .await
        .unwrap();
    (queued[0].id.clone(), layer)
}

/// A tar of `files` (relative paths) as a driver folder is packed.
fn driver_tar(files: &[(&str, &[u8])]) -> Vec<u8> {
    let mut b = tar::Builder::new(Vec::new());
    for (path, data) in files {
        let mut header = tar::Header::new_gnu();
        header.set_size(data.len() as u64);
        header.set_mode(0o644);
        header.set_entry_type(tar::EntryType::Regular);
        b.append_data(&mut header, path, *data).unwrap();
    }
    b.into_inner().unwrap()
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
    // End users land in their file portal.
    assert_eq!(a.location, "/portal");
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

// ---- Jobs in the UI, the file portal (issue 4, second slice) ----

impl Harness {
    /// A GET as `role`'s browser session, with the body's raw bytes (downloads).
    async fn download(
        &self,
        role: Role,
        path: &str,
    ) -> (StatusCode, axum::http::HeaderMap, Vec<u8>) {
        let req = Request::builder()
            .uri(path)
            .header(
                header::COOKIE,
                format!("{}={}", auth::SESSION_COOKIE, self.session(role)),
            )
            .body(Body::empty())
            .unwrap();
        let resp = self.app.clone().oneshot(req).await.unwrap();
        let (parts, body) = resp.into_parts();
        let bytes = axum::body::to_bytes(body, usize::MAX).await.unwrap();
        (parts.status, parts.headers, bytes.to_vec())
    }

    /// A snapshot of the end user's device holding a file stored as three chunks, so
    /// downloads go through the pack store. Returns the snapshot id and the file's bytes.
    async fn chunked_snapshot(&self) -> (String, Vec<u8>) {
        let data: Vec<u8> = (0..3000u32).map(|i| (i % 251) as u8).collect();
        let mut b = PackBuilder::default();
        let mut chunks = Vec::new();
        for piece in data.chunks(1024) {
            let id = Id::of(piece);
            b.add_stored(
                id,
                BlobKind::Chunk,
                Compression::None,
                piece,
                piece.len() as u32,
            );
            chunks.push(id);
        }
        let (record, entries) = self.store.store(b.finish()).unwrap();
        self.catalog.insert_pack(&record, &entries).await.unwrap();
        let big = Entry {
            name: b"big.bin".to_vec(),
            kind: Some(Kind::File),
            mode: 0o600,
            size: data.len() as u64,
            content: Content::Chunks {
                file: morgana_core::id::FileIdHasher::of(&chunks),
                chunks,
            },
            ..Default::default()
        };
        let inner = Tree {
            entries: vec![file("note.txt", b"inner note")],
        };
        let inner_id = inner.seal().0;
        let work = Tree {
            entries: vec![
                big,
                folder("inner", inner_id),
                file("ünï code.txt", b"utf-8"),
            ],
        };
        let work_id = work.seal().0;
        let root = Tree {
            entries: vec![folder("work", work_id)],
        };
        let ids = store_trees(&self.catalog, &self.store, &[&inner, &work, &root]).await;
        let s = snapshot(&self.catalog, &self.own_device, ids[2], 7).await;
        (s, data)
    }
}

fn portal_events(body: &str) -> usize {
    body.matches("portal.download").count()
}

#[tokio::test]
async fn the_portal_downloads_files_and_zipped_folders_and_audits_each() {
    let h = harness().await;
    let own = &h.own_device;
    let (s, data) = h.chunked_snapshot().await;

    let (status, headers, body) = h
        .download(
            Role::EndUser,
            &format!("/portal/devices/{own}/snapshots/{s}/file?path=%2Fwork%2Fbig.bin"),
        )
        .await;
    assert_eq!(status, StatusCode::OK);
    assert_eq!(body, data);
    assert_eq!(
        headers[header::CONTENT_DISPOSITION].to_str().unwrap(),
        "attachment; filename=\"big.bin\"; filename*=UTF-8''big.bin"
    );
    assert_eq!(
        headers[header::CONTENT_LENGTH],
        data.len().to_string().as_str()
    );

    let (status, headers, zip) = h
        .download(
            Role::EndUser,
            &format!("/portal/devices/{own}/snapshots/{s}/zip?path=%2Fwork"),
        )
        .await;
    assert_eq!(status, StatusCode::OK);
    assert_eq!(headers[header::CONTENT_TYPE], "application/zip");
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("work.zip");
    std::fs::write(&path, &zip).unwrap();
    // An independent reader: names, sizes, every CRC, the bytes.
    let script = r#"
import sys, zipfile
z = zipfile.ZipFile(sys.argv[1])
assert z.testzip() is None
for i in z.infolist():
    print(i.filename, i.file_size, oct(i.external_attr >> 16))
sys.stdout.flush()
open(sys.argv[2], "wb").write(z.read("work/big.bin"))
"#;
    let out = std::process::Command::new("python3")
        .args(["-c", script])
        .arg(&path)
        .arg(dir.path().join("big.bin"))
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert_eq!(
        String::from_utf8(out.stdout).unwrap(),
        // A folder's entries in name order, then its subfolders' contents.
        "work/big.bin 3000 0o100600\nwork/inner/ 0 0o40755\nwork/ünï code.txt 5 0o100644\n\
         work/inner/note.txt 10 0o100644\n"
    );
    assert_eq!(std::fs::read(dir.path().join("big.bin")).unwrap(), data);

    // The whole snapshot, from its root.
    let (status, _, zip) = h
        .download(
            Role::EndUser,
            &format!("/portal/devices/{own}/snapshots/{s}/zip?path=%2F"),
        )
        .await;
    assert_eq!(status, StatusCode::OK);
    assert!(zip.starts_with(b"PK\x03\x04"));

    // Each download is an audit event naming the user, the path and the snapshot.
    let a = h
        .api(
            Who::As(Role::Administrator),
            "GET",
            "/api/v1/events?kind=portal.download",
            None,
        )
        .await;
    assert_eq!(portal_events(&a.body), 3, "{}", a.body);
    assert!(a.body.contains("\"actor\":\"user:ann\""), "{}", a.body);
    assert!(
        a.body.contains(&format!("/work/big.bin from snapshot {s}")),
        "{}",
        a.body
    );

    // A folder is not a file, a file not a folder, a missing path is missing: each says so.
    for (what, path, want) in [
        ("file", "%2Fwork", StatusCode::BAD_REQUEST),
        ("zip", "%2Fwork%2Fbig.bin", StatusCode::BAD_REQUEST),
        ("file", "%2Fwork%2Fnope", StatusCode::NOT_FOUND),
    ] {
        let a = h
            .ui(
                Who::As(Role::EndUser),
                "GET",
                &format!("/portal/devices/{own}/snapshots/{s}/{what}?path={path}"),
                "",
                false,
            )
            .await;
        assert_eq!(a.status, want, "{what} {path}: {}", a.body);
    }
    // Nothing of those was recorded as a download.
    let a = h
        .api(
            Who::As(Role::Administrator),
            "GET",
            "/api/v1/events?kind=portal.download",
            None,
        )
        .await;
    assert_eq!(portal_events(&a.body), 3);
}

#[tokio::test]
async fn an_end_user_reaches_only_their_own_files_in_the_portal() {
    let h = harness().await;
    let end = Who::As(Role::EndUser);
    let (own, other) = (&h.own_device, &h.other_device);
    let s_own = &h.own_snapshots[1];
    let s_other = &h.other_snapshot;
    for path in [
        format!("/portal/devices/{other}"),
        format!("/portal/devices/{other}/snapshots/{s_other}/tree?path=%2F"),
        format!("/portal/devices/{other}/snapshots/{s_other}/file?path=%2Fdocs%2Fa.txt"),
        format!("/portal/devices/{other}/snapshots/{s_other}/zip?path=%2Fdocs"),
        // A foreign device with one's own snapshot id.
        format!("/portal/devices/{other}/snapshots/{s_own}/file?path=%2Fdocs%2Fa.txt"),
        // One's own device with a foreign snapshot id (same trees even: still refused).
        format!("/portal/devices/{own}/snapshots/{s_other}/tree?path=%2F"),
        format!("/portal/devices/{own}/snapshots/{s_other}/file?path=%2Fdocs%2Fa.txt"),
        format!("/portal/devices/{own}/snapshots/{s_other}/zip?path=%2F"),
        "/portal/devices/0000000000000000".into(),
        "/portal/devices/..%2F..".into(),
    ] {
        let a = h.ui(end, "GET", &path, "", false).await;
        assert_eq!(a.status, StatusCode::NOT_FOUND, "{path}: {}", a.body);
        assert!(!a.body.contains("bob-desktop"), "{path} leaks: {}", a.body);
    }
    // `..` in a path is refused as such, never walked.
    for what in ["tree", "file", "zip"] {
        let path =
            format!("/portal/devices/{own}/snapshots/{s_own}/{what}?path=%2Fdocs%2F..%2F..%2Fpics");
        let a = h.ui(end, "GET", &path, "", false).await;
        assert_eq!(a.status, StatusCode::BAD_REQUEST, "{path}: {}", a.body);
        assert!(a.body.contains("without `..`"), "{}", a.body);
    }
    // Jobs are staff pages: refused whatever the id.
    let job = crate::jobs::queue(h.catalog.as_ref(), other, JobKind::Sync, "test")
        .await
        .unwrap()
        .id;
    for path in [
        "/jobs".to_owned(),
        format!("/jobs/{job}"),
        format!("/jobs/{job}/progress"),
        format!("/devices/{own}/restore?snapshot={s_own}"),
    ] {
        let a = h.ui(end, "GET", &path, "", false).await;
        assert_eq!(a.status, StatusCode::FORBIDDEN, "{path}");
    }
    let a = h
        .api(end, "GET", &format!("/api/v1/jobs/{job}"), None)
        .await;
    assert_eq!(a.status, StatusCode::FORBIDDEN);
    // The portal's list and search show only their own device.
    let a = h.ui(end, "GET", "/portal", "", false).await;
    assert!(a.body.contains("ann-laptop") && !a.body.contains("bob-desktop"));
    let a = h.ui(end, "GET", "/portal/search?q=a", "", false).await;
    assert!(a.body.contains("ann-laptop") && !a.body.contains("bob-desktop"));
    // Staff who own nothing see an empty portal, with what to do.
    let a = h
        .ui(Who::As(Role::Administrator), "GET", "/portal", "", false)
        .await;
    assert!(
        a.body.contains("No device is registered to you"),
        "{}",
        a.body
    );
}

#[tokio::test]
async fn an_administrator_turns_the_portal_off_and_on() {
    let h = harness().await;
    let end = Who::As(Role::EndUser);
    let admin = Who::As(Role::Administrator);
    let own = &h.own_device;
    let s = &h.own_snapshots[1];
    let a = h
        .ui(
            admin,
            "POST",
            &format!("/devices/{own}/portal"),
            "enabled=false",
            true,
        )
        .await;
    assert_eq!(a.status, StatusCode::SEE_OTHER);
    let page = h.ui(admin, "GET", &a.location, "", false).await;
    assert!(
        page.body.contains("The file portal is off"),
        "{}",
        page.body
    );
    for path in [
        format!("/portal/devices/{own}"),
        format!("/portal/devices/{own}/snapshots/{s}/tree?path=%2F"),
        format!("/portal/devices/{own}/snapshots/{s}/file?path=%2Fdocs%2Fa.txt"),
        format!("/portal/devices/{own}/snapshots/{s}/zip?path=%2Fdocs"),
    ] {
        let a = h.ui(end, "GET", &path, "", false).await;
        assert_eq!(a.status, StatusCode::FORBIDDEN, "{path}");
        assert!(a.body.contains("file portal is turned off"), "{}", a.body);
    }
    let a = h.ui(end, "GET", "/portal", "", false).await;
    assert!(a.body.contains("The portal is off for this device"));
    // The API's device routes are closed to the end user as well.
    for path in [
        format!("/api/v1/devices/{own}/snapshots"),
        format!("/api/v1/devices/{own}/snapshots/{s}/tree?path=/docs"),
    ] {
        let a = h.api(end, "GET", &path, None).await;
        assert_eq!(a.status, StatusCode::FORBIDDEN, "{path}: {}", a.body);
    }
    // Search skips it.
    let a = h.ui(end, "GET", "/portal/search?q=cat", "", false).await;
    assert!(
        a.body.contains("No file or folder name contains"),
        "{}",
        a.body
    );
    // Nonsense is refused and changes nothing.
    let a = h
        .ui(
            admin,
            "POST",
            &format!("/devices/{own}/portal"),
            "enabled=maybe",
            true,
        )
        .await;
    assert_eq!(a.status, StatusCode::BAD_REQUEST);
    assert_eq!(
        h.catalog.device_portal_enabled(own).await.unwrap(),
        Some(false)
    );
    // On again through the API.
    let a = h
        .api(
            admin,
            "PUT",
            &format!("/api/v1/devices/{own}/portal"),
            Some(r#"{"enabled":true}"#),
        )
        .await;
    assert_eq!(a.status, StatusCode::OK, "{}", a.body);
    let (status, _, body) = h
        .download(
            Role::EndUser,
            &format!("/portal/devices/{own}/snapshots/{s}/file?path=%2Fdocs%2Fa.txt"),
        )
        .await;
    assert_eq!((status, body.as_slice()), (StatusCode::OK, &b"alpha"[..]));
    let a = h
        .api(admin, "GET", "/api/v1/events?kind=portal.", None)
        .await;
    assert!(a.body.contains("portal.disabled") && a.body.contains("portal.enabled"));
}

#[tokio::test]
async fn portal_search_finds_names_across_snapshots_and_says_when_capped() {
    let h = harness().await;
    let ann = h.catalog.user("ann").await.unwrap().unwrap();
    let r = super::portal::search(h.catalog.as_ref(), &ann, "CAT", 100, 100)
        .await
        .unwrap();
    // cat.jpg changed between the two snapshots: one match in each.
    let found: Vec<(&str, &str)> = r
        .found
        .iter()
        .map(|f| (f.snapshot.as_str(), f.path.as_str()))
        .collect();
    assert_eq!(
        found,
        vec![
            (h.own_snapshots[1].as_str(), "/pics/cat.jpg"),
            (h.own_snapshots[0].as_str(), "/pics/cat.jpg"),
        ]
    );
    assert!(!r.capped);
    // The shared `docs` folder is read once: 2 roots + docs + 2 pics folders.
    assert_eq!(r.trees_read, 5);
    let r = super::portal::search(h.catalog.as_ref(), &ann, "cat", 100, 1)
        .await
        .unwrap();
    assert!(r.capped && r.found.len() == 1);
    let r = super::portal::search(h.catalog.as_ref(), &ann, ".txt", 2, 100)
        .await
        .unwrap();
    assert!(r.capped && r.trees_read == 2);
    let a = h
        .ui(
            Who::As(Role::EndUser),
            "GET",
            "/portal/search?q=b.txt",
            "",
            false,
        )
        .await;
    assert!(a.body.contains("/docs/b.txt") && !a.body.contains("search-capped"));
}

#[tokio::test]
async fn restores_from_the_ui_are_confirmed_then_queued_and_followed() {
    let h = harness().await;
    let help = Who::As(Role::Helpdesk);
    let own = &h.own_device;
    let s = &h.own_snapshots[1];
    let form = format!("snapshot={s}&scope=paths&path=%2Fdocs&to=%2Fsrv%2Frestored");
    // First the confirmation, which says what will happen; nothing is queued yet.
    let a = h
        .ui(
            help,
            "POST",
            &format!("/devices/{own}/restore"),
            &form,
            true,
        )
        .await;
    assert_eq!(a.status, StatusCode::OK);
    assert!(
        a.body
            .contains("/docs is copied from the snapshot into /srv/restored"),
        "{}",
        a.body
    );
    assert!(h.catalog.jobs(Some(own), 10).await.unwrap().is_empty());
    let a = h
        .ui(
            help,
            "POST",
            &format!("/devices/{own}/restore"),
            &format!("{form}&confirmed=yes"),
            true,
        )
        .await;
    assert_eq!(a.status, StatusCode::SEE_OTHER);
    let jobs = h.catalog.jobs(Some(own), 10).await.unwrap();
    assert_eq!(jobs.len(), 1);
    let job = &jobs[0];
    assert_eq!(a.location, format!("/jobs/{}", job.id));
    assert_eq!(job.created_by, "user:help");
    assert_eq!(
        crate::jobs::describe(&job.kind),
        format!("restore of /docs from snapshot {s} of device {own} into /srv/restored")
    );
    // The job page polls its progress fragment while the job runs…
    let page = h.ui(help, "GET", &a.location, "", false).await;
    assert!(
        page.body
            .contains(&format!("hx-get=\"/jobs/{}/progress\"", job.id))
    );
    assert!(page.body.contains("queued"));
    let taken = h
        .catalog
        .take_next_job(own, crate::clock::now_ms())
        .await
        .unwrap()
        .unwrap();
    assert_eq!(taken.id, job.id);
    let report = |state, done| morgana_core::control::JobReport {
        job_id: job.id.clone(),
        state,
        progress: morgana_core::control::JobProgress {
            files_done: done,
            files_total: 2,
            bytes_done: done * 5,
            bytes_total: 10,
        },
        message: String::new(),
        files: None,
    };
    use morgana_core::control::JobState;
    h.catalog
        .report_job(own, &report(JobState::Running, 1), crate::clock::now_ms())
        .await
        .unwrap()
        .unwrap();
    let frag = h
        .ui(
            help,
            "GET",
            &format!("/jobs/{}/progress", job.id),
            "",
            false,
        )
        .await;
    assert!(
        frag.body.contains("running") && frag.body.contains("1 of 2"),
        "{}",
        frag.body
    );
    assert!(frag.body.contains("hx-trigger"));
    // …and stops once it has finished.
    h.catalog
        .report_job(own, &report(JobState::Succeeded, 2), crate::clock::now_ms())
        .await
        .unwrap()
        .unwrap();
    let frag = h
        .ui(
            help,
            "GET",
            &format!("/jobs/{}/progress", job.id),
            "",
            false,
        )
        .await;
    assert!(frag.body.contains("succeeded") && frag.body.contains("2 of 2"));
    assert!(!frag.body.contains("hx-trigger"), "{}", frag.body);
    let list = h
        .ui(help, "GET", &format!("/jobs?device={own}"), "", false)
        .await;
    assert!(list.body.contains(&job.id));

    // A helpdesk user cannot revert a device, confirmed or not; nothing is queued.
    for extra in ["", "&confirmed=yes"] {
        let a = h
            .ui(
                help,
                "POST",
                &format!("/devices/{own}/restore"),
                &format!("snapshot={s}&scope=full{extra}"),
                true,
            )
            .await;
        assert_eq!(a.status, StatusCode::FORBIDDEN);
        assert!(a.body.contains("protection manager"), "{}", a.body);
    }
    // A protection manager is told what a full revert does.
    let a = h
        .ui(
            Who::As(Role::ProtectionManager),
            "POST",
            &format!("/devices/{own}/restore"),
            &format!("snapshot={s}&scope=full"),
            true,
        )
        .await;
    assert!(a.body.contains("pre-revert snapshot") && a.body.contains("files it lacks are"));
    // Bad input says what is wrong and queues nothing.
    for (form, needle) in [
        (
            format!("snapshot={s}&scope=paths&path=%2Fa%2F..%2Fb"),
            "without `..`",
        ),
        (format!("snapshot={s}&scope=paths&path=docs"), "absolute"),
        (
            "snapshot=nope&scope=paths&path=%2Fdocs&confirmed=yes".to_owned(),
            "no snapshot",
        ),
        (
            format!("snapshot={s}&scope=everything&confirmed=yes"),
            "not a restore scope",
        ),
    ] {
        let a = h
            .ui(
                help,
                "POST",
                &format!("/devices/{own}/restore"),
                &form,
                true,
            )
            .await;
        assert!(a.status.is_client_error(), "{form}");
        assert!(a.body.contains(needle), "{form}: {}", a.body);
    }
    // The API gives the same jobs.
    let a = h
        .api(help, "GET", &format!("/api/v1/jobs?device={own}"), None)
        .await;
    let v: serde_json::Value = serde_json::from_str(&a.body).unwrap();
    assert_eq!(v["jobs"].as_array().unwrap().len(), 1);
    assert_eq!(v["jobs"][0]["state"], "succeeded");
    let a = h
        .api(
            help,
            "POST",
            &format!("/api/v1/devices/{own}/jobs"),
            Some(r#"{"type":"restore","snapshot":"nope","paths":["/x"]}"#),
        )
        .await;
    assert_eq!(a.status, StatusCode::NOT_FOUND, "{}", a.body);
    let a = h
        .api(
            help,
            "POST",
            &format!("/api/v1/devices/{own}/jobs"),
            Some(r#"{"type":"format-disk"}"#),
        )
        .await;
    assert_eq!(a.status, StatusCode::BAD_REQUEST, "{}", a.body);
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

#[tokio::test]
async fn the_nodes_page_counts_each_volumes_packs_and_space() {
    let h = harness().await;
    let _ = h.chunked_snapshot().await;
    let packs = h.catalog.packs_page(None, 1000).await.unwrap();
    let bytes: u64 = packs.iter().map(|p| p.size).sum();
    let a = h
        .api(Who::As(Role::Administrator), "GET", "/api/v1/nodes", None)
        .await;
    assert_eq!(a.status, StatusCode::OK, "{}", a.body);
    let v: serde_json::Value = serde_json::from_str(&a.body).unwrap();
    let vol = &v["volumes"][0];
    assert!(!packs.is_empty());
    assert_eq!(vol["packs"], packs.len() as u64, "{v}");
    assert_eq!(vol["pack_bytes"], bytes, "{v}");
    assert_eq!(v["packs_elsewhere"], 0);
    let pct = vol["used_percent"].as_f64().unwrap();
    assert!((0.0..=100.0).contains(&pct), "{v}");
    assert!(vol["available_bytes"].as_u64().unwrap() > 0, "{v}");
    let page = h
        .ui(Who::As(Role::Administrator), "GET", "/nodes", "", false)
        .await;
    assert!(
        page.body.contains(vol["path"].as_str().unwrap()),
        "{}",
        page.body
    );
}

/// A tar with entries written byte for byte (the `tar` crate's builder refuses hostile
/// names, which is what these archives carry): (name, type, link target, data).
fn raw_tar(entries: &[(&str, tar::EntryType, &str, &[u8])]) -> Vec<u8> {
    let mut b = tar::Builder::new(Vec::new());
    for (name, kind, link, data) in entries {
        let mut header = tar::Header::new_gnu();
        let gnu = header.as_gnu_mut().unwrap();
        gnu.name[..name.len()].copy_from_slice(name.as_bytes());
        gnu.linkname[..link.len()].copy_from_slice(link.as_bytes());
        header.set_entry_type(*kind);
        header.set_mode(0o644);
        header.set_size(data.len() as u64);
        header.set_cksum();
        b.append(&header, *data).unwrap();
    }
    b.into_inner().unwrap()
}

#[tokio::test]
async fn image_routes_refuse_bad_input_with_clear_errors_and_change_nothing() {
    let h = harness().await;
    let own = h.own_device.clone();
    let other = h.other_device.clone();
    let s2 = h.own_snapshots[1].clone();
    image_fixture(&h, &own, &s2).await;
    let im = Who::As(Role::ImageManager);
    let c = h.catalog.as_ref();
    let state = || async {
        (
            c.jobs(None, 500).await.unwrap().len(),
            c.layers().await.unwrap().len(),
            c.groups().await.unwrap(),
            c.driver_sets().await.unwrap().len(),
            c.driver_profiles().await.unwrap().len(),
            c.layer_assignment(&other).await.unwrap().is_some(),
        )
    };
    let before = state().await;

    // Unknown layer, in the UI and the API.
    let a = h
        .ui(
            im,
            "POST",
            "/images/assign",
            &format!("devices={own}&base=no-such-layer"),
            true,
        )
        .await;
    assert_eq!(a.status, StatusCode::NOT_FOUND, "{}", a.body);
    assert!(
        a.body.contains("there is no layer no-such-layer"),
        "{}",
        a.body
    );
    let a = h
        .api(
            im,
            "POST",
            "/api/v1/assignments",
            Some(&format!(
                r#"{{"devices":["{other}"],"base":"matrix-base:9"}}"#
            )),
        )
        .await;
    assert_eq!(a.status, StatusCode::NOT_FOUND, "{}", a.body);
    assert!(a.body.contains("matrix-base v9"), "{}", a.body);
    // An app layer where the base goes.
    let a = h
        .api(
            im,
            "POST",
            "/api/v1/assignments/dry-run",
            Some(&format!(
                r#"{{"devices":["{other}"],"base":"matrix-base","apps":["matrix-base"]}}"#
            )),
        )
        .await;
    assert_eq!(a.status, StatusCode::BAD_REQUEST, "{}", a.body);
    assert!(a.body.contains("not an app one"), "{}", a.body);

    // No devices at all: the form re-renders with the error; the API says the same.
    let a = h
        .ui(
            im,
            "POST",
            "/images/assign",
            "base=matrix-base&confirmed=yes",
            true,
        )
        .await;
    assert_eq!(a.status, StatusCode::BAD_REQUEST, "{}", a.body);
    assert!(a.body.contains("no devices named"), "{}", a.body);
    assert!(a.body.contains("id=\"assign-form\""), "{}", a.body);
    let a = h
        .api(
            im,
            "POST",
            "/api/v1/assignments",
            Some(r#"{"devices":[],"base":"matrix-base"}"#),
        )
        .await;
    assert_eq!(a.status, StatusCode::BAD_REQUEST, "{}", a.body);
    assert!(a.body.contains("no devices named"), "{}", a.body);
    let a = h
        .api(
            im,
            "POST",
            "/api/v1/assignments",
            Some(&format!(
                r#"{{"groups":["nope"],"devices":["{other}"],"base":"matrix-base"}}"#
            )),
        )
        .await;
    assert_eq!(a.status, StatusCode::NOT_FOUND, "{}", a.body);
    assert!(
        a.body.contains("no device group \\\"nope\\\""),
        "{}",
        a.body
    );
    // A relative do-not-override path.
    let a = h
        .api(
            im,
            "POST",
            "/api/v1/assignments",
            Some(&format!(
                r#"{{"devices":["{other}"],"base":"matrix-base","do_not_override":["etc/motd"]}}"#
            )),
        )
        .await;
    assert_eq!(a.status, StatusCode::BAD_REQUEST, "{}", a.body);
    assert!(a.body.contains("not an absolute path"), "{}", a.body);

    // Captures: a bad name, a device that is no reference machine, an app layer from one
    // snapshot to itself.
    let a = h
        .ui(
            im,
            "POST",
            "/images/capture",
            &format!("device={own}&kind=base&name=bad+name%21&confirmed=yes"),
            true,
        )
        .await;
    assert_eq!(a.status, StatusCode::BAD_REQUEST, "{}", a.body);
    assert!(a.body.contains("is not usable"), "{}", a.body);
    let a = h
        .api(
            im,
            "POST",
            "/api/v1/layers",
            Some(&format!(
                r#"{{"kind":"base","name":"x","device":"{other}"}}"#
            )),
        )
        .await;
    assert_eq!(a.status, StatusCode::BAD_REQUEST, "{}", a.body);
    assert!(a.body.contains("is not a reference machine"), "{}", a.body);
    let a = h
        .api(
            im,
            "POST",
            "/api/v1/layers",
            Some(&format!(
                r#"{{"kind":"app","name":"x","device":"{own}","before":"{s2}","after":"{s2}"}}"#
            )),
        )
        .await;
    assert_eq!(a.status, StatusCode::BAD_REQUEST, "{}", a.body);
    assert!(a.body.contains("are the same"), "{}", a.body);

    // Rollback of a device nothing was applied to.
    let a = h
        .api(
            im,
            "POST",
            &format!("/api/v1/devices/{other}/rollback"),
            None,
        )
        .await;
    assert_eq!(a.status, StatusCode::CONFLICT, "{}", a.body);
    assert!(a.body.contains("no applied layers"), "{}", a.body);

    // Groups: a bad name, an unknown device.
    let a = h
        .ui(
            im,
            "POST",
            "/images/groups",
            &format!("name=a+b&devices={own}"),
            true,
        )
        .await;
    assert_eq!(a.status, StatusCode::BAD_REQUEST, "{}", a.body);
    let a = h
        .api(
            im,
            "PUT",
            "/api/v1/groups/lab",
            Some(r#"{"devices":["ghost"]}"#),
        )
        .await;
    assert_eq!(a.status, StatusCode::BAD_REQUEST, "{}", a.body);
    assert!(
        a.body.contains("there is no device \\\"ghost\\\""),
        "{}",
        a.body
    );

    // Malformed profile TOML: refused on save, reported by the preview.
    let a = h
        .api(
            im,
            "PUT",
            "/api/v1/driver-profiles/lenovo",
            Some(r#"{"toml":"all = { vendor = "}"#),
        )
        .await;
    assert_eq!(a.status, StatusCode::BAD_REQUEST, "{}", a.body);
    assert!(a.body.contains("is not a driver profile"), "{}", a.body);
    let a = h
        .ui(
            im,
            "POST",
            "/images/driver-profiles/preview",
            "name=lenovo&toml=all+%3D+%7B+vendor+%3D+%22X%22+%7D%0Asets+%3D+%5B%5D",
            true,
        )
        .await;
    assert_eq!(a.status, StatusCode::OK);
    assert!(a.body.contains("id=\"preview-error\""), "{}", a.body);
    assert!(a.body.contains("`sets` is empty"), "{}", a.body);

    // Hostile archives: each refused naming the entry, nothing imported or left behind.
    use tar::EntryType as T;
    // (path, kind, link target, contents) per archive entry.
    type TarEntry<'a> = (&'a str, T, &'a str, &'a [u8]);
    let hostile: [(&[TarEntry], &str); 5] = [
        (&[("../escape.ko", T::Regular, "", b"x")], "climbs out"),
        (&[("/etc/evil.ko", T::Regular, "", b"x")], "absolute path"),
        (&[("lib", T::Symlink, "../../etc", b"")], "outside the tree"),
        (
            &[
                ("a/link", T::Symlink, "..", b""),
                ("a/link/x.ko", T::Regular, "", b"x"),
            ],
            "through a symlink",
        ),
        (&[("hard", T::Link, "/etc/shadow", b"")], "hard link"),
    ];
    for (entries, why) in hostile {
        let body = String::from_utf8(raw_tar(entries)).unwrap();
        let a = h
            .api(im, "POST", "/api/v1/driver-sets?name=evil", Some(&body))
            .await;
        assert_eq!(a.status, StatusCode::BAD_REQUEST, "{why}: {}", a.body);
        assert!(a.body.contains(why), "{why}: {}", a.body);
        assert!(a.body.contains("nothing was imported"), "{}", a.body);
    }
    let a = h
        .api(
            im,
            "POST",
            "/api/v1/driver-sets?name=evil",
            Some("not a tar at all, sorry"),
        )
        .await;
    assert_eq!(a.status, StatusCode::BAD_REQUEST, "{}", a.body);
    // The same through the UI's upload form.
    let tar = raw_tar(&[("../escape.ko", T::Regular, "", b"x")]);
    let secret = h.session(Role::ImageManager);
    let mut body = b"--XB\r\nContent-Disposition: form-data; name=\"name\"\r\n\r\nevil\r\n--XB\r\n\
Content-Disposition: form-data; name=\"file\"; filename=\"evil.tar\"\r\n\
Content-Type: application/x-tar\r\n\r\n"
        .to_vec();
    body.extend_from_slice(&tar);
    body.extend_from_slice(b"\r\n--XB--\r\n");
    let req = Request::builder()
        .method("POST")
        .uri(format!(
            "/images/driver-sets?csrf={}",
            auth::csrf_token(secret)
        ))
        .header(header::COOKIE, format!("{}={secret}", auth::SESSION_COOKIE))
        .header(header::CONTENT_TYPE, "multipart/form-data; boundary=XB")
        .body(Body::from(body))
        .unwrap();
    let a = h.send(req).await;
    assert_eq!(a.status, StatusCode::BAD_REQUEST, "{}", a.body);
    assert!(a.body.contains("climbs out of the tree"), "{}", a.body);
    let leftovers: Vec<_> = std::fs::read_dir(h._dir.path())
        .unwrap()
        .filter_map(|e| e.ok())
        .filter(|e| {
            e.file_name()
                .to_string_lossy()
                .starts_with("driver-upload-")
        })
        .collect();
    assert!(leftovers.is_empty(), "{leftovers:?}");
    assert!(!h._dir.path().join("escape.ko").exists());

    assert_eq!(state().await, before, "bad input changed nothing");
}
