//! A small Kubernetes API client for skep's own agents and CLI.
//!
//! It speaks plain JSON (`serde_json::Value`) to any Kubernetes-compatible
//! API server over TLS (rustls, the cluster CA from the kubeconfig), with a
//! bearer token or a client certificate, over a pooled HTTP/2-or-1.1
//! connection; errors carry the server's `Status`. Watches are streams of
//! decoded events.

pub mod identity;
pub mod kubeconfig;
pub mod tls;

use bytes::Bytes;
use futures::{Stream, StreamExt};
use http::{Method, Request, StatusCode, header};
use http_body_util::{BodyExt, Full};
use hyper_util::{
    client::legacy::{Client as HyperClient, connect::HttpConnector},
    rt::TokioExecutor,
};
use serde_json::Value;
use std::{pin::Pin, sync::Arc};

pub use kubeconfig::{Auth, Kubeconfig};

#[derive(Debug, thiserror::Error)]
pub enum ClientError {
    #[error("kubeconfig {path}: {detail}")]
    Kubeconfig { path: String, detail: String },
    #[error("TLS setup: {0}")]
    Tls(String),
    #[error("{method} {path}: cannot reach the API server: {detail}")]
    Transport {
        method: String,
        path: String,
        detail: String,
    },
    /// The server answered with an error `Status`.
    #[error("{message} ({code} {reason})")]
    Status {
        code: u16,
        reason: String,
        message: String,
        status: Box<Value>,
    },
    #[error("{0}: the response is not valid JSON")]
    Decode(String),
}

impl ClientError {
    pub fn code(&self) -> Option<u16> {
        match self {
            Self::Status { code, .. } => Some(*code),
            _ => None,
        }
    }

    pub fn is_not_found(&self) -> bool {
        self.code() == Some(404)
    }

    pub fn is_conflict(&self) -> bool {
        self.code() == Some(409)
    }
}

type Https = hyper_rustls::HttpsConnector<HttpConnector>;

/// A client for one API server; cheap to clone.
#[derive(Clone)]
pub struct Client {
    http: HyperClient<Https, Full<Bytes>>,
    base: Arc<str>,
    token: Option<Arc<str>>,
}

impl std::fmt::Debug for Client {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Client")
            .field("server", &self.base)
            .finish_non_exhaustive()
    }
}

/// One watch event.
#[derive(Debug, Clone, PartialEq)]
pub struct WatchEvent {
    /// ADDED, MODIFIED, DELETED, BOOKMARK or ERROR.
    pub kind: String,
    pub object: Value,
}

pub type WatchStream = Pin<Box<dyn Stream<Item = Result<WatchEvent, ClientError>> + Send>>;

fn pem_certs(pem: &[u8]) -> Result<Vec<rustls::pki_types::CertificateDer<'static>>, ClientError> {
    rustls_pemfile::certs(&mut &pem[..])
        .collect::<Result<Vec<_>, _>>()
        .map_err(|e| ClientError::Tls(format!("bad PEM certificate: {e}")))
}

impl Client {
    /// A client from a kubeconfig file (its current context).
    pub fn from_kubeconfig(path: &std::path::Path) -> Result<Self, ClientError> {
        let kc = Kubeconfig::load(path)?;
        Self::new(&kc.server, &kc.ca_pem, kc.auth)
    }

    pub fn new(server: &str, ca_pem: &[u8], auth: Auth) -> Result<Self, ClientError> {
        let mut roots = rustls::RootCertStore::empty();
        for cert in pem_certs(ca_pem)? {
            roots
                .add(cert)
                .map_err(|e| ClientError::Tls(format!("the CA certificate is unusable: {e}")))?;
        }
        let builder = rustls::ClientConfig::builder_with_provider(Arc::new(
            rustls::crypto::ring::default_provider(),
        ))
        .with_safe_default_protocol_versions()
        .map_err(|e| ClientError::Tls(e.to_string()))?
        .with_root_certificates(roots);
        let (tls, token) = match auth {
            Auth::Token(t) => (builder.with_no_client_auth(), Some(Arc::from(t.as_str()))),
            Auth::Certificate { cert_pem, key_pem } => {
                let key = rustls_pemfile::private_key(&mut &key_pem[..])
                    .map_err(|e| ClientError::Tls(format!("bad client key: {e}")))?
                    .ok_or_else(|| ClientError::Tls("no private key in the client key".into()))?;
                let tls = builder
                    .with_client_auth_cert(pem_certs(&cert_pem)?, key)
                    .map_err(|e| ClientError::Tls(e.to_string()))?;
                (tls, None)
            }
            Auth::None => (builder.with_no_client_auth(), None),
        };
        let https = hyper_rustls::HttpsConnectorBuilder::new()
            .with_tls_config(tls)
            .https_only()
            .enable_all_versions()
            .build();
        let http = HyperClient::builder(TokioExecutor::new()).build(https);
        Ok(Self {
            http,
            base: Arc::from(server.trim_end_matches('/')),
            token,
        })
    }

    pub fn server(&self) -> &str {
        &self.base
    }

    async fn send(
        &self,
        method: Method,
        path: &str,
        body: Option<Vec<u8>>,
        content_type: &str,
        accept: &str,
    ) -> Result<hyper::Response<hyper::body::Incoming>, ClientError> {
        let mut req = Request::builder()
            .method(method.clone())
            .uri(format!("{}{}", self.base, path))
            .header(header::ACCEPT, accept)
            .header(
                header::USER_AGENT,
                concat!("skep/", env!("CARGO_PKG_VERSION")),
            );
        if let Some(t) = &self.token {
            req = req.header(header::AUTHORIZATION, format!("Bearer {t}"));
        }
        if body.is_some() {
            req = req.header(header::CONTENT_TYPE, content_type);
        }
        let req = req
            .body(Full::new(Bytes::from(body.unwrap_or_default())))
            .map_err(|e| ClientError::Transport {
                method: method.to_string(),
                path: path.to_owned(),
                detail: e.to_string(),
            })?;
        self.http
            .request(req)
            .await
            .map_err(|e| ClientError::Transport {
                method: method.to_string(),
                path: path.to_owned(),
                detail: format!("{e:#}"),
            })
    }

    /// A request with a JSON (or other) body; the answer decoded as JSON.
    pub async fn request(
        &self,
        method: Method,
        path: &str,
        body: Option<&Value>,
        content_type: &str,
    ) -> Result<Value, ClientError> {
        let body = body.map(|b| b.to_string().into_bytes());
        self.request_raw(method, path, body, content_type, "application/json")
            .await
    }

    /// Like [`Client::request`] with a raw body and Accept header.
    pub async fn request_raw(
        &self,
        method: Method,
        path: &str,
        body: Option<Vec<u8>>,
        content_type: &str,
        accept: &str,
    ) -> Result<Value, ClientError> {
        let resp = self
            .send(method.clone(), path, body, content_type, accept)
            .await?;
        let status = resp.status();
        let bytes = resp
            .into_body()
            .collect()
            .await
            .map_err(|e| ClientError::Transport {
                method: method.to_string(),
                path: path.to_owned(),
                detail: format!("reading the response: {e}"),
            })?
            .to_bytes();
        decode(status, &bytes, &format!("{method} {path}"))
    }

    /// A GET's status and raw body, whatever the status.
    async fn get_raw(&self, path: &str) -> Result<(StatusCode, Bytes), ClientError> {
        let resp = self.send(Method::GET, path, None, "", "*/*").await?;
        let status = resp.status();
        let bytes = resp
            .into_body()
            .collect()
            .await
            .map_err(|e| ClientError::Transport {
                method: "GET".into(),
                path: path.to_owned(),
                detail: format!("reading the response: {e}"),
            })?
            .to_bytes();
        Ok((status, bytes))
    }

    /// A GET whose answer is text (pod logs); a non-2xx answer is decoded
    /// as the server's `Status`.
    pub async fn get_text(&self, path: &str) -> Result<String, ClientError> {
        let (status, bytes) = self.get_raw(path).await?;
        if !status.is_success() {
            return decode(status, &bytes, &format!("GET {path}")).map(|_| String::new());
        }
        Ok(String::from_utf8_lossy(&bytes).into_owned())
    }

    /// A GET whose answer is text whatever its status (health endpoints
    /// answer 500 with a plain-text list of failed checks).
    pub async fn get_text_status(&self, path: &str) -> Result<(u16, String), ClientError> {
        let (status, bytes) = self.get_raw(path).await?;
        Ok((
            status.as_u16(),
            String::from_utf8_lossy(&bytes).into_owned(),
        ))
    }

    pub async fn get(&self, path: &str) -> Result<Value, ClientError> {
        self.request(Method::GET, path, None, "application/json")
            .await
    }

    pub async fn create(&self, path: &str, obj: &Value) -> Result<Value, ClientError> {
        self.request(Method::POST, path, Some(obj), "application/json")
            .await
    }

    pub async fn replace(&self, path: &str, obj: &Value) -> Result<Value, ClientError> {
        self.request(Method::PUT, path, Some(obj), "application/json")
            .await
    }

    pub async fn merge_patch(&self, path: &str, patch: &Value) -> Result<Value, ClientError> {
        self.request(
            Method::PATCH,
            path,
            Some(patch),
            "application/merge-patch+json",
        )
        .await
    }

    /// Server-side apply of `obj` as `manager`.
    pub async fn apply(
        &self,
        path: &str,
        obj: &Value,
        manager: &str,
    ) -> Result<Value, ClientError> {
        let sep = if path.contains('?') { '&' } else { '?' };
        self.request(
            Method::PATCH,
            &format!("{path}{sep}fieldManager={manager}&force=true"),
            Some(obj),
            "application/apply-patch+yaml",
        )
        .await
    }

    pub async fn delete(&self, path: &str) -> Result<Value, ClientError> {
        self.request(Method::DELETE, path, None, "application/json")
            .await
    }

    /// A watch on a collection path (`?watch=1` is added), as a stream of
    /// events. The stream ends when the server ends the watch.
    pub async fn watch(&self, path: &str) -> Result<WatchStream, ClientError> {
        let sep = if path.contains('?') { '&' } else { '?' };
        let full = format!("{path}{sep}watch=1");
        let resp = self
            .send(Method::GET, &full, None, "", "application/json")
            .await?;
        let status = resp.status();
        if !status.is_success() {
            let bytes = resp
                .into_body()
                .collect()
                .await
                .map(|c| c.to_bytes())
                .unwrap_or_default();
            return Err(decode(status, &bytes, &format!("WATCH {path}"))
                .err()
                .unwrap_or(ClientError::Decode(full)));
        }
        let body = resp.into_body().into_data_stream();
        let what = full.clone();
        let stream = futures::stream::unfold(
            (body, Vec::<u8>::new(), what),
            |(mut body, mut buf, what)| async move {
                loop {
                    if let Some(pos) = buf.iter().position(|&b| b == b'\n') {
                        let line: Vec<u8> = buf.drain(..=pos).collect();
                        let event = serde_json::from_slice::<Value>(&line)
                            .map_err(|_| ClientError::Decode(what.clone()))
                            .map(|v| WatchEvent {
                                kind: v
                                    .get("type")
                                    .and_then(Value::as_str)
                                    .unwrap_or("")
                                    .to_owned(),
                                object: v.get("object").cloned().unwrap_or(Value::Null),
                            });
                        return Some((event, (body, buf, what)));
                    }
                    match body.next().await {
                        Some(Ok(chunk)) => buf.extend_from_slice(&chunk),
                        Some(Err(e)) => {
                            let err = ClientError::Transport {
                                method: "WATCH".into(),
                                path: what.clone(),
                                detail: e.to_string(),
                            };
                            return Some((Err(err), (body, Vec::new(), what)));
                        }
                        None => return None,
                    }
                }
            },
        );
        Ok(Box::pin(stream))
    }
}

fn decode(status: StatusCode, bytes: &[u8], what: &str) -> Result<Value, ClientError> {
    let value: Value = if bytes.is_empty() {
        Value::Null
    } else {
        match serde_json::from_slice(bytes) {
            Ok(v) => v,
            Err(_) if !status.is_success() => {
                return Err(ClientError::Status {
                    code: status.as_u16(),
                    reason: status.canonical_reason().unwrap_or("").to_owned(),
                    message: String::from_utf8_lossy(bytes).into_owned(),
                    status: Box::new(Value::Null),
                });
            }
            Err(_) => return Err(ClientError::Decode(what.to_owned())),
        }
    };
    if status.is_success() {
        return Ok(value);
    }
    Err(ClientError::Status {
        code: status.as_u16(),
        reason: value
            .get("reason")
            .and_then(Value::as_str)
            .unwrap_or("")
            .to_owned(),
        message: value
            .get("message")
            .and_then(Value::as_str)
            .unwrap_or_else(|| status.canonical_reason().unwrap_or(""))
            .to_owned(),
        status: Box::new(value),
    })
}
