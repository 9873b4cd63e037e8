//! `httpGet` probes, with the kubelet's HTTP client behaviour: HTTP/1.1,
//! one connection per probe (`Connection: close`), HTTPS without
//! certificate verification, `User-Agent: kube-probe/…` and `Accept: */*`
//! unless the probe sets them, redirects followed only while they stay on
//! the probed host (at most 10), success for statuses 200–399.

use super::{MAX_OUTPUT, ProbeResult, ProbeTarget, USER_AGENT, connect, host_port, resolve_port};
use bytes::Bytes;
use http::{HeaderName, HeaderValue, StatusCode, header};
use http_body_util::{BodyExt, Empty};
use hyper_util::rt::TokioIo;
use serde_json::Value;
use skep_client::tls::AnyServerCert;
use std::{
    sync::{Arc, OnceLock},
    time::Duration,
};
use tokio::io::{AsyncRead, AsyncWrite};
use url::Url;

/// Go's client gives up after this many redirects, and so does the kubelet.
const MAX_REDIRECTS: usize = 10;

pub(super) async fn probe(spec: &Value, target: &ProbeTarget, timeout: Duration) -> ProbeResult {
    let request = match ProbeRequest::from_spec(spec, target) {
        Ok(r) => r,
        Err(e) => return ProbeResult::Failure(e),
    };
    // One deadline for everything (connect, TLS, redirects, body), like
    // Go's Client.Timeout.
    match tokio::time::timeout(timeout, request.run(timeout)).await {
        Ok(Ok(response)) => verdict(&request.url, response),
        Ok(Err(e)) => ProbeResult::Failure(e),
        Err(_) => ProbeResult::Failure(format!(
            "Get \"{}\": context deadline exceeded (Client.Timeout exceeded while awaiting headers)",
            request.url
        )),
    }
}

fn verdict(url: &Url, response: Response) -> ProbeResult {
    let code = response.status.as_u16();
    let body = String::from_utf8_lossy(&response.body);
    if (200..400).contains(&code) {
        if code >= 300 {
            // A redirect off the probed host is not followed; the kubelet
            // counts it as success with a warning.
            tracing::warn!(%url, status = code, location = ?response.location, "probe terminated redirects");
        }
        tracing::trace!(%url, status = code, %body, "HTTP probe succeeded");
        ProbeResult::Success
    } else {
        tracing::debug!(%url, status = code, %body, "HTTP probe failed");
        ProbeResult::Failure(format!("HTTP probe failed with statuscode: {code}"))
    }
}

struct ProbeRequest {
    url: Url,
    /// The probe's headers plus the defaults; `Host` is kept apart because
    /// it replaces the URL's authority rather than adding a header.
    headers: Vec<(HeaderName, HeaderValue)>,
    host: Option<HeaderValue>,
}

struct Response {
    status: StatusCode,
    location: Option<String>,
    /// The first MAX_OUTPUT bytes, for logs.
    body: Vec<u8>,
}

impl ProbeRequest {
    fn from_spec(spec: &Value, target: &ProbeTarget) -> Result<Self, String> {
        let scheme = spec
            .get("scheme")
            .and_then(Value::as_str)
            .unwrap_or("HTTP")
            .to_ascii_lowercase();
        if scheme != "http" && scheme != "https" {
            return Err(format!("unsupported HTTP probe scheme {scheme:?}"));
        }
        let port = resolve_port(spec.get("port"), &target.container)?;
        let host = match spec.get("host").and_then(Value::as_str) {
            Some(h) if !h.is_empty() => h.to_string(),
            _ => target.default_host().to_string(),
        };
        let path = spec.get("path").and_then(Value::as_str).unwrap_or("");
        let slash = if path.starts_with('/') { "" } else { "/" };
        let raw = format!("{scheme}://{}{slash}{path}", host_port(&host, port));
        let url = Url::parse(&raw).map_err(|e| format!("invalid probe URL {raw:?}: {e}"))?;

        let mut headers = Vec::new();
        let mut host_header = None;
        for h in spec
            .get("httpHeaders")
            .and_then(Value::as_array)
            .into_iter()
            .flatten()
        {
            let name = h.get("name").and_then(Value::as_str).unwrap_or("");
            let value = h.get("value").and_then(Value::as_str).unwrap_or("");
            let name = HeaderName::from_bytes(name.as_bytes())
                .map_err(|e| format!("invalid probe header name {name:?}: {e}"))?;
            let value = HeaderValue::from_str(value)
                .map_err(|e| format!("invalid value for probe header {name}: {e}"))?;
            if name == header::HOST {
                host_header = Some(value);
            } else {
                headers.push((name, value));
            }
        }
        for (name, default) in [(header::USER_AGENT, USER_AGENT), (header::ACCEPT, "*/*")] {
            if !headers.iter().any(|(n, _)| *n == name) {
                headers.push((name, HeaderValue::from_static(default)));
            }
        }
        Ok(Self {
            url,
            headers,
            host: host_header,
        })
    }

    /// Sends the request, following redirects that stay on the probed host.
    async fn run(&self, timeout: Duration) -> Result<Response, String> {
        let mut url = self.url.clone();
        let mut redirects = 0;
        loop {
            let response = self
                .send(&url, timeout)
                .await
                .map_err(|e| format!("Get \"{url}\": {e}"))?;
            let next = match redirect_location(&url, &response) {
                Some(next) => next,
                None => return Ok(response),
            };
            if next.host_str() != self.url.host_str() {
                return Ok(response);
            }
            if redirects == MAX_REDIRECTS {
                return Err(format!(
                    "Get \"{next}\": stopped after {MAX_REDIRECTS} redirects"
                ));
            }
            tracing::debug!(from = %url, to = %next, "HTTP probe follows a redirect");
            redirects += 1;
            url = next;
        }
    }

    /// One request on a fresh connection.
    async fn send(&self, url: &Url, timeout: Duration) -> Result<Response, String> {
        let host = url.host_str().ok_or("the URL has no host")?;
        let port = url.port_or_known_default().ok_or("the URL has no port")?;
        let request = self.build(url)?;
        let tcp = connect(host, port, timeout).await?;
        if url.scheme() == "https" {
            let name = server_name(url)?;
            let tls = tokio_rustls::TlsConnector::from(tls_config()?)
                .connect(name, tcp)
                .await
                .map_err(|e| format!("TLS handshake: {e}"))?;
            exchange(tls, request).await
        } else {
            exchange(tcp, request).await
        }
    }

    fn build(&self, url: &Url) -> Result<http::Request<Empty<Bytes>>, String> {
        let target = &url[url::Position::BeforePath..url::Position::AfterQuery];
        let authority = match url.port() {
            Some(port) => format!("{}:{port}", url.host_str().unwrap_or_default()),
            None => url.host_str().unwrap_or_default().to_string(),
        };
        let host = match &self.host {
            Some(h) => h.clone(),
            None => HeaderValue::from_str(&authority).map_err(|e| e.to_string())?,
        };
        let mut builder = http::Request::get(target)
            .header(header::HOST, host)
            .header(header::CONNECTION, "close");
        for (name, value) in &self.headers {
            builder = builder.header(name, value);
        }
        builder.body(Empty::new()).map_err(|e| e.to_string())
    }
}

/// Where a redirect response points, resolved against the request's URL;
/// None when the response is not one Go's client follows.
fn redirect_location(url: &Url, response: &Response) -> Option<Url> {
    let followed = [301, 302, 303, 307, 308];
    if !followed.contains(&response.status.as_u16()) {
        return None;
    }
    url.join(response.location.as_deref()?).ok()
}

/// Writes the request and reads the status and up to MAX_OUTPUT bytes of
/// body. The connection is driven in this task, so a timeout (dropping this
/// future) closes the socket.
async fn exchange<S>(stream: S, request: http::Request<Empty<Bytes>>) -> Result<Response, String>
where
    S: AsyncRead + AsyncWrite + Unpin + Send + 'static,
{
    let (mut sender, conn) = hyper::client::conn::http1::handshake(TokioIo::new(stream))
        .await
        .map_err(|e| e.to_string())?;
    let work = async move {
        let response = sender
            .send_request(request)
            .await
            .map_err(|e| e.to_string())?;
        let status = response.status();
        let location = response
            .headers()
            .get(header::LOCATION)
            .and_then(|v| v.to_str().ok())
            .map(str::to_string);
        let mut body = response.into_body();
        let mut kept = Vec::new();
        while kept.len() < MAX_OUTPUT {
            match body.frame().await {
                None => break,
                Some(Ok(frame)) => {
                    if let Ok(data) = frame.into_data() {
                        let room = MAX_OUTPUT - kept.len();
                        kept.extend_from_slice(&data[..data.len().min(room)]);
                    }
                }
                Some(Err(e)) => return Err(format!("reading the body: {e}")),
            }
        }
        Ok(Response {
            status,
            location,
            body: kept,
        })
    };
    tokio::pin!(work);
    tokio::pin!(conn);
    tokio::select! {
        biased;
        result = &mut work => result,
        ended = &mut conn => match ended {
            // The server closed after a complete response: the response
            // half still has it.
            Ok(()) => work.await,
            Err(e) => Err(e.to_string()),
        },
    }
}

fn server_name(url: &Url) -> Result<rustls::pki_types::ServerName<'static>, String> {
    use rustls::pki_types::ServerName;
    match url.host() {
        Some(url::Host::Domain(d)) => {
            ServerName::try_from(d.to_string()).map_err(|e| format!("invalid TLS name {d:?}: {e}"))
        }
        Some(url::Host::Ipv4(ip)) => Ok(ServerName::IpAddress(std::net::IpAddr::V4(ip).into())),
        Some(url::Host::Ipv6(ip)) => Ok(ServerName::IpAddress(std::net::IpAddr::V6(ip).into())),
        None => Err("the URL has no host".into()),
    }
}

/// The kubelet probes HTTPS endpoints with InsecureSkipVerify: pods serve
/// self-signed certificates for names the kubelet does not dial. The
/// handshake signature is still checked, so the connection is at least
/// bound to the presented key.
fn tls_config() -> Result<Arc<rustls::ClientConfig>, String> {
    static CONFIG: OnceLock<Result<Arc<rustls::ClientConfig>, String>> = OnceLock::new();
    CONFIG
        .get_or_init(|| {
            let provider = Arc::new(rustls::crypto::ring::default_provider());
            let config = rustls::ClientConfig::builder_with_provider(provider.clone())
                .with_safe_default_protocol_versions()
                .map_err(|e| format!("TLS client configuration: {e}"))?
                .dangerous()
                .with_custom_certificate_verifier(Arc::new(AnyServerCert::new(provider)))
                .with_no_client_auth();
            Ok(Arc::new(config))
        })
        .clone()
}
