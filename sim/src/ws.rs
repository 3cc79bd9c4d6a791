//! Opening the simulator's websockets: as Twilio to the service, and as a bridge to an OpenAI
//! Realtime or GPT-Live server. Errors never contain the auth token or the API key.

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

/// The voice webhook's URL for a stream URL: same host, `http(s)` for `ws(s)`, and the path's
/// `/media-stream` replaced by `/voice` (any other path is replaced whole).
pub fn voice_url_for(stream_url: &str) -> String {
    let (scheme, rest) = match stream_url.split_once("://") {
        Some(("wss", rest)) => ("https", rest),
        Some(("ws", rest)) => ("http", rest),
        Some((scheme, rest)) => (scheme, rest),
        None => ("http", stream_url),
    };
    let (authority, path) = rest.split_at(rest.find('/').unwrap_or(rest.len()));
    let base = path.strip_suffix("/media-stream").unwrap_or("");
    format!("{scheme}://{authority}{base}/voice")
}

/// What Twilio does before it opens a stream: POST the voice webhook for `call_sid` (signed,
/// when there is an auth token) and read the `<Parameter>`s of the `<Stream>` it answers,
/// which the stream's `start` must carry (the service's stream token among them).
pub async fn voice_webhook(
    stream_url: &str,
    auth: &TwilioAuth,
    call_sid: &str,
) -> anyhow::Result<Vec<(String, String)>> {
    let call =
        callbridge_fakes::webhook::IncomingCall::new(call_sid, "+15005550006", "+15005550001");
    let signing = callbridge_fakes::webhook::Signing {
        auth_token: auth.auth_token.clone(),
        signed_url: auth.signed_url.as_deref().map(voice_url_for),
    };
    let twiml = callbridge_fakes::webhook::answer_call(&voice_url_for(stream_url), &call, &signing)
        .await
        .map_err(|e| anyhow!("voice webhook: {e}"))?;
    let (_, params) = twiml.stream().ok_or_else(|| {
        anyhow!("the voice webhook answered no <Connect><Stream> (full or draining?)")
    })?;
    Ok(params.to_vec())
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

/// Connects to a GPT-Live endpoint as a bridge does (`gpt-live.md` §1): the URL as given, with
/// no query (the model goes in `session.start`), `Authorization: Bearer <api_key>` and no
/// `OpenAI-Beta` header.
pub async fn connect_live(url: &str, api_key: &str) -> anyhow::Result<Socket> {
    if url.contains('?') {
        anyhow::bail!("a GPT-Live URL takes no query (the model goes in session.start): {url}");
    }
    let mut request = url
        .into_client_request()
        .with_context(|| format!("bad websocket URL {url}"))?;
    let bearer = HeaderValue::from_str(&format!("Bearer {api_key}"))
        .map_err(|_| anyhow!("the API key is not a valid header value"))?;
    request.headers_mut().insert("authorization", bearer);
    open(request, url).await
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

#[cfg(test)]
mod tests {
    #[test]
    fn voice_urls() {
        use super::voice_url_for;
        assert_eq!(
            voice_url_for("ws://127.0.0.1:8080/media-stream"),
            "http://127.0.0.1:8080/voice"
        );
        assert_eq!(
            voice_url_for("wss://b.example/x/media-stream"),
            "https://b.example/x/voice"
        );
        assert_eq!(voice_url_for("ws://h:1/other"), "http://h:1/voice");
    }
}
