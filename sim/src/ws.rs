//! Opening the simulator's websockets: as Twilio to the service, and as a bridge to an OpenAI
//! Realtime server. Errors never contain the auth token or the API key.

use anyhow::{anyhow, Context as _};
use tokio::net::TcpStream;
use tokio_tungstenite::{
    tungstenite::{client::IntoClientRequest as _, http::HeaderValue, protocol::WebSocketConfig},
    MaybeTlsStream, WebSocketStream,
};

use callbridge_fakes::twilio::{self, USER_AGENT};

/// An open client websocket.
pub type Socket = WebSocketStream<MaybeTlsStream<TcpStream>>;

/// Socket buffers sized for 20 ms frames of a few hundred bytes. Tungstenite's defaults
/// (128 KiB each way) would make a thousand simulated calls cost the machine 250 MiB, and the
/// simulator shares the machine with what it measures.
pub fn config() -> WebSocketConfig {
    WebSocketConfig::default()
        .read_buffer_size(8 * 1024)
        .write_buffer_size(0)
}

/// How to sign the upgrade, for a service that checks `X-Twilio-Signature`.
#[derive(Clone, Debug, Default)]
pub struct TwilioAuth {
    /// The Twilio auth token; no signature is sent without one.
    pub auth_token: Option<String>,
    /// The URL to sign, when it is not the `wss://` form of the URL connected to (a proxy or
    /// tunnel in front of the service: the `server.public_url` + `/media-stream`).
    pub signed_url: Option<String>,
}

/// Connects to a Media Streams endpoint as Twilio does.
pub async fn connect_twilio(url: &str, auth: &TwilioAuth) -> anyhow::Result<Socket> {
    let mut request = url
        .into_client_request()
        .with_context(|| format!("bad websocket URL {url}"))?;
    let headers = request.headers_mut();
    headers.insert("user-agent", HeaderValue::from_static(USER_AGENT));
    if let Some(token) = &auth.auth_token {
        let signed = auth
            .signed_url
            .clone()
            .unwrap_or_else(|| twilio::signed_stream_url(url));
        let signature = twilio::upgrade_signature(token, &signed);
        headers.insert(
            "x-twilio-signature",
            HeaderValue::from_str(&signature).context("signature is not a header value")?,
        );
    }
    open(request, url).await
}

/// Connects to an OpenAI Realtime endpoint (adds `?model=gpt-realtime` when the URL has no
/// query) with `Authorization: Bearer <api_key>`.
pub async fn connect_openai(url: &str, api_key: &str) -> anyhow::Result<Socket> {
    let full = if url.contains('?') {
        url.to_owned()
    } else {
        format!("{url}?model=gpt-realtime")
    };
    let mut request = full
        .as_str()
        .into_client_request()
        .with_context(|| format!("bad websocket URL {full}"))?;
    let bearer = HeaderValue::from_str(&format!("Bearer {api_key}"))
        .map_err(|_| anyhow!("the API key is not a valid header value"))?;
    request.headers_mut().insert("authorization", bearer);
    open(request, &full).await
}

async fn open(
    request: tokio_tungstenite::tungstenite::handshake::client::Request,
    url: &str,
) -> anyhow::Result<Socket> {
    // Nagle off: a 20 ms frame must not wait for the previous one's ACK.
    let (socket, _) = tokio_tungstenite::connect_async_with_config(request, Some(config()), true)
        .await
        .map_err(|e| match e {
            tokio_tungstenite::tungstenite::Error::Http(response) => {
                anyhow!("{url} refused the upgrade: HTTP {}", response.status())
            }
            other => anyhow!("cannot connect to {url}: {other}"),
        })?;
    Ok(socket)
}
