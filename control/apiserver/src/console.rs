//! The web console: static assets under `/ui`, embedded in the binary.
//!
//! The assets hold no cluster data, so they are served without
//! authentication; the page fetches everything it shows from the ordinary
//! API with the user's bearer token, so RBAC applies exactly as it does
//! to kubectl. The Content-Security-Policy keeps the page to its own
//! origin: no inline scripts, no outside hosts.

use bytes::Bytes;
use http::{Method, Response, StatusCode, header};

/// The policy every console response carries.
pub const CSP: &str = "default-src 'self'; connect-src 'self'; img-src 'self' data:; \
                       style-src 'self'; script-src 'self'; object-src 'none'; \
                       base-uri 'none'; frame-ancestors 'none'; form-action 'none'";

/// One embedded file.
#[derive(Debug)]
pub struct Asset {
    pub name: &'static str,
    pub content_type: &'static str,
    pub body: &'static [u8],
}

const JS: &str = "text/javascript; charset=utf-8";

/// An asset served under its file name in `control/apiserver/console/`
/// (one name for both, so the two cannot drift apart).
macro_rules! embedded {
    ($name:literal, $content_type:expr) => {
        Asset {
            name: $name,
            content_type: $content_type,
            body: include_bytes!(concat!("../console/", $name)),
        }
    };
}

/// Every file under `control/apiserver/console/`.
pub const ASSETS: &[Asset] = &[
    embedded!("index.html", "text/html; charset=utf-8"),
    embedded!("style.css", "text/css; charset=utf-8"),
    embedded!("favicon.svg", "image/svg+xml"),
    embedded!("app.js", JS),
    embedded!("api.js", JS),
    embedded!("util.js", JS),
    embedded!("overview.js", JS),
    embedded!("workloads.js", JS),
    embedded!("servicemap.js", JS),
    embedded!("policies.js", JS),
    embedded!("events.js", JS),
];

/// The asset a path below `/ui` names (`""` is the page itself).
pub fn asset(path: &str) -> Option<&'static Asset> {
    let name = match path.trim_matches('/') {
        "" => "index.html",
        p => p,
    };
    ASSETS.iter().find(|a| a.name == name)
}

/// The response to `METHOD /ui/<path>`: the asset, 404 for unknown
/// names, 405 for anything but GET and HEAD.
pub fn respond(method: &Method, path: &str) -> Response<Bytes> {
    let (status, content_type, body) = if *method != Method::GET && *method != Method::HEAD {
        (
            StatusCode::METHOD_NOT_ALLOWED,
            "text/plain; charset=utf-8",
            Bytes::from_static(b"method not allowed\n"),
        )
    } else {
        match asset(path) {
            Some(a) if *method == Method::HEAD => (StatusCode::OK, a.content_type, Bytes::new()),
            Some(a) => (StatusCode::OK, a.content_type, Bytes::from_static(a.body)),
            None => (
                StatusCode::NOT_FOUND,
                "text/plain; charset=utf-8",
                Bytes::from_static(b"no such console asset\n"),
            ),
        }
    };
    let mut builder = Response::builder()
        .status(status)
        .header(header::CONTENT_TYPE, content_type)
        // Assets change with the binary; revalidation is cheap.
        .header(header::CACHE_CONTROL, "no-cache")
        .header(header::CONTENT_SECURITY_POLICY, CSP)
        .header(header::X_CONTENT_TYPE_OPTIONS, "nosniff")
        .header(header::REFERRER_POLICY, "no-referrer")
        .header(header::X_FRAME_OPTIONS, "DENY");
    if *method != Method::GET && *method != Method::HEAD {
        builder = builder.header(header::ALLOW, "GET, HEAD");
    }
    builder
        .body(body)
        .unwrap_or_else(|_| Response::new(Bytes::new()))
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used, clippy::expect_used)]
    use super::*;

    fn header(r: &Response<Bytes>, name: header::HeaderName) -> &str {
        r.headers().get(name).unwrap().to_str().unwrap()
    }

    #[test]
    fn serves_each_asset_with_its_type_and_the_policy() {
        for (path, ct) in [
            ("", "text/html; charset=utf-8"),
            ("/", "text/html; charset=utf-8"),
            ("index.html", "text/html; charset=utf-8"),
            ("app.js", "text/javascript; charset=utf-8"),
            ("servicemap.js", "text/javascript; charset=utf-8"),
            ("style.css", "text/css; charset=utf-8"),
            ("favicon.svg", "image/svg+xml"),
        ] {
            let r = respond(&Method::GET, path);
            assert_eq!(r.status(), StatusCode::OK, "{path}");
            assert_eq!(header(&r, header::CONTENT_TYPE), ct, "{path}");
            assert_eq!(header(&r, header::CACHE_CONTROL), "no-cache");
            let csp = header(&r, header::CONTENT_SECURITY_POLICY);
            assert!(
                csp.starts_with("default-src 'self'; connect-src 'self'"),
                "{csp}"
            );
            assert!(!r.body().is_empty(), "{path}");
        }
        let head = respond(&Method::HEAD, "app.js");
        assert_eq!(head.status(), StatusCode::OK);
        assert!(head.body().is_empty());
    }

    #[test]
    fn unknown_assets_and_methods_are_refused() {
        for path in ["nope.js", "../Cargo.toml", "index.html/x", "console/app.js"] {
            let r = respond(&Method::GET, path);
            assert_eq!(r.status(), StatusCode::NOT_FOUND, "{path}");
            assert!(r.headers().contains_key(header::CONTENT_SECURITY_POLICY));
        }
        let r = respond(&Method::POST, "index.html");
        assert_eq!(r.status(), StatusCode::METHOD_NOT_ALLOWED);
        assert_eq!(header(&r, header::ALLOW), "GET, HEAD");
    }

    #[test]
    fn every_module_the_page_imports_is_served() {
        for a in ASSETS {
            let text = std::str::from_utf8(a.body).unwrap();
            for (i, _) in text.match_indices("from './") {
                let rest = &text[i + "from './".len()..];
                let name = &rest[..rest.find('\'').unwrap()];
                assert!(asset(name).is_some(), "{} imports {name}", a.name);
            }
        }
    }

    #[test]
    fn the_page_embeds_no_credentials_and_no_outside_hosts() {
        for a in ASSETS {
            let text = std::str::from_utf8(a.body).unwrap();
            let lower = text.to_lowercase();
            // A JWT (service-account token) starts with a base64 `{"`.
            assert!(!text.contains("eyJ"), "{} embeds a token", a.name);
            assert!(!lower.contains("bearer ey"), "{}", a.name);
            for outside in ["http://", "https://", "//cdn", "@import"] {
                let allowed = outside == "http://" && lower.contains("http://www.w3.org/2000/svg");
                let count = lower.matches(outside).count()
                    - if allowed {
                        lower.matches("http://www.w3.org/2000/svg").count()
                    } else {
                        0
                    };
                assert_eq!(count, 0, "{} refers to {outside}", a.name);
            }
            // No inline scripts or handlers: the CSP would block them.
            if a.name.ends_with(".html") {
                assert!(!lower.contains("<script>"), "{}", a.name);
                assert!(!lower.contains("onclick="), "{}", a.name);
            }
        }
    }
}
