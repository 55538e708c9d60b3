//! CSS and scripts embedded in the binary, served under content-hashed names so browsers
//! may cache them for a year: a new binary with new assets has new names.

use std::sync::LazyLock;

use axum::extract::Path;
use axum::http::{HeaderValue, StatusCode, header};
use axum::response::{IntoResponse, Response};

pub struct Asset {
    /// `app.3f9a0c1b2d4e.css`: stem, hash, extension.
    pub name: String,
    content_type: &'static str,
    bytes: &'static [u8],
}

fn asset(stem: &str, ext: &str, content_type: &'static str, bytes: &'static [u8]) -> Asset {
    let hash = blake3::hash(bytes).to_hex();
    Asset {
        name: format!("{stem}.{}.{ext}", &hash[..12]),
        content_type,
        bytes,
    }
}

pub struct Assets {
    pub css: Asset,
    pub htmx: Asset,
    pub app_js: Asset,
}

pub static ASSETS: LazyLock<Assets> = LazyLock::new(|| Assets {
    css: asset(
        "app",
        "css",
        "text/css; charset=utf-8",
        include_bytes!("../../static/app.css"),
    ),
    htmx: asset(
        "htmx",
        "js",
        "text/javascript; charset=utf-8",
        include_bytes!("../../static/htmx.min.js"),
    ),
    app_js: asset(
        "app",
        "js",
        "text/javascript; charset=utf-8",
        include_bytes!("../../static/app.js"),
    ),
});

/// `/static/NAME` for the templates.
pub fn url(a: &Asset) -> String {
    format!("/static/{}", a.name)
}

pub async fn serve(Path(file): Path<String>) -> Response {
    let a = &*ASSETS;
    let Some(asset) = [&a.css, &a.htmx, &a.app_js]
        .into_iter()
        .find(|x| x.name == file)
    else {
        // An old name after an upgrade, most likely: the page referring to it is stale.
        return (
            StatusCode::NOT_FOUND,
            "no such file: reload the page to get the current one",
        )
            .into_response();
    };
    (
        [
            (
                header::CONTENT_TYPE,
                HeaderValue::from_static(asset.content_type),
            ),
            (
                header::CACHE_CONTROL,
                HeaderValue::from_static("public, max-age=31536000, immutable"),
            ),
        ],
        asset.bytes,
    )
        .into_response()
}
