//! The errors the fake answers, shaped like Twilio's (`twilio-rest.md` G): a JSON body
//! `{"code","message","more_info","status"}`, or the same fields in Twilio's XML envelope when
//! the path had no `.json`. Pure code.

use serde_json::json;

/// Twilio's generic "a parameter has a bad value" answer. The code is the fake's choice: the
/// reference names no code for a bad `Status`, `Method` or `Timeout`, or for `Status`, `Twiml`
/// and `Url` sent together (UNCONFIRMED).
pub const INVALID_PARAMETER: u32 = 20001;

/// One error answer.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct RestError {
    /// HTTP status.
    pub status: u16,
    /// Twilio's error code (`20404`, `21220`, …).
    pub code: u32,
    pub message: String,
}

impl RestError {
    pub fn new(status: u16, code: u32, message: impl Into<String>) -> RestError {
        RestError {
            status,
            code,
            message: message.into(),
        }
    }

    /// 401/20003: credentials refused (wrong pair, unknown key, another account's path).
    pub fn authenticate() -> RestError {
        RestError::new(401, 20003, "Authenticate")
    }

    /// 404/20404: an unknown resource, or `Status=completed` on a call that has ended.
    pub fn not_found(path: &str) -> RestError {
        RestError::new(
            404,
            20404,
            format!("The requested resource {path} was not found"),
        )
    }

    /// 405/20004: a method the resource does not have.
    pub fn method_not_allowed(method: &str) -> RestError {
        RestError::new(405, 20004, format!("Method not allowed: {method}"))
    }

    /// 400/21220: a redirect (`Twiml`/`Url`) of a call that is not in progress.
    pub fn not_in_progress() -> RestError {
        RestError::new(400, 21220, "Call is not in-progress. Cannot redirect.")
    }

    /// 429/20429: too many concurrent requests; not processed, safe to retry.
    pub fn too_many_requests() -> RestError {
        RestError::new(429, 20429, "Too Many Requests")
    }

    /// 400/21201: no `To`.
    pub fn missing_to() -> RestError {
        RestError::new(400, 21201, "No 'To' number is specified")
    }

    /// 400/21213: no `From`.
    pub fn missing_from() -> RestError {
        RestError::new(400, 21213, "No 'From' number is specified")
    }

    /// 400/21211: `To` is not a valid number or address.
    pub fn invalid_to(to: &str) -> RestError {
        RestError::new(400, 21211, format!("Invalid 'To' Phone Number: {to}"))
    }

    /// 400/21212: `From` is not a valid phone number.
    pub fn invalid_from(from: &str) -> RestError {
        RestError::new(400, 21212, format!("Invalid 'From' Phone Number: {from}"))
    }

    /// 400/21210: `From` is neither a number of the account nor a verified caller ID.
    pub fn unverified_from(from: &str) -> RestError {
        RestError::new(
            400,
            21210,
            format!(
                "The source phone number provided, {from}, is not yet verified for your \
                 account. You may only make calls from phone numbers that you've verified or \
                 purchased from Twilio."
            ),
        )
    }

    /// 400/21205: no `Url`, `Twiml` or `ApplicationSid` on a create.
    pub fn url_required() -> RestError {
        RestError::new(400, 21205, "Url parameter is required.")
    }

    /// 400/21205: a URL parameter that is not an absolute http(s) URL. Twilio uses 21205 for
    /// `Url`; the fake uses it for every URL parameter (UNCONFIRMED for the others).
    pub fn invalid_url(param: &str, value: &str) -> RestError {
        RestError::new(400, 21205, format!("{param} is not a valid URL: {value}"))
    }

    /// 400/32018: `Twiml` over 4000 characters.
    pub fn twiml_too_long(chars: usize) -> RestError {
        RestError::new(
            400,
            32018,
            format!(
                "Twiml parameter has {chars} characters: it must be no more than 4000 \
                 characters"
            ),
        )
    }

    /// 400/12100: a `Twiml` parameter Twilio cannot read. The reference does not say whether
    /// the API refuses it at once or the call fails later with 12100 in the call log; the fake
    /// refuses it at once, with that code.
    pub fn invalid_twiml(why: &str) -> RestError {
        RestError::new(400, 12100, format!("Document parse failure: {why}"))
    }

    /// 400/[`INVALID_PARAMETER`]: a bad value for `param`.
    pub fn invalid_parameter(message: impl Into<String>) -> RestError {
        RestError::new(400, INVALID_PARAMETER, message)
    }

    /// `https://www.twilio.com/docs/errors/{code}`.
    pub fn more_info(&self) -> String {
        format!("https://www.twilio.com/docs/errors/{}", self.code)
    }

    /// The JSON body, with the four keys in the order Twilio sends them.
    pub fn to_json(&self) -> String {
        json!({
            "code": self.code,
            "message": self.message,
            "more_info": self.more_info(),
            "status": self.status,
        })
        .to_string()
    }

    /// The XML body of the 2010-04-01 API (a path without `.json`).
    pub fn to_xml(&self) -> String {
        format!(
            "<?xml version='1.0' encoding='UTF-8'?>\n<TwilioResponse><RestException>\
             <Code>{}</Code><Message>{}</Message><MoreInfo>{}</MoreInfo><Status>{}</Status>\
             </RestException></TwilioResponse>",
            self.code,
            xml_text(&self.message),
            xml_text(&self.more_info()),
            self.status
        )
    }
}

/// `s` escaped for XML text.
pub(crate) fn xml_text(s: &str) -> String {
    s.replace('&', "&amp;")
        .replace('<', "&lt;")
        .replace('>', "&gt;")
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::Value;

    /// The body pipecat#2145 observed for a call that had ended.
    #[test]
    fn json_is_shaped_like_twilios() {
        let e = RestError::not_found("/2010-04-01/Accounts/AC1/Calls/CA1.json");
        let v: Value = serde_json::from_str(&e.to_json()).unwrap();
        assert_eq!(
            v,
            serde_json::json!({"code": 20404,
                "message": "The requested resource /2010-04-01/Accounts/AC1/Calls/CA1.json was not found",
                "more_info": "https://www.twilio.com/docs/errors/20404", "status": 404})
        );
        let auth: Value = serde_json::from_str(&RestError::authenticate().to_json()).unwrap();
        assert_eq!(auth["message"], "Authenticate");
        assert_eq!(auth["code"], 20003);
        assert_eq!(auth["status"], 401);
    }

    #[test]
    fn xml_escapes_the_message() {
        let xml = RestError::invalid_twiml("a < b & c").to_xml();
        assert!(xml.contains("<Code>12100</Code>"), "{xml}");
        assert!(xml.contains("a &lt; b &amp; c"), "{xml}");
    }
}
