//! The client's one error type. Callers switch on the variant (and on
//! [`ErrorCode`] for [`Error::Api`]), never on messages.

use std::time::Duration;

use gworker_api::ErrorCode;

pub type Result<T, E = Error> = std::result::Result<T, E>;

/// A boxed transport error (hyper, io) kept as the source of [`Error::Unavailable`].
pub type BoxError = Box<dyn std::error::Error + Send + Sync + 'static>;

#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// The sandbox (or process) is unknown or was already terminated.
    #[error("{message}")]
    NotFound { message: String },

    /// A `wait` whose timeout elapsed before the process exited.
    #[error("timed out after {:.1} s waiting for the process to exit", after.as_secs_f64())]
    Timeout { after: Duration },

    /// The daemon could not be reached (not running, wrong URL, restarted mid-request).
    #[error("cannot reach the gworker daemon at {url}: {}; is it running? start it with `gworker serve` (or set GWORKER_URL)", root_cause(source.as_ref()))]
    Unavailable {
        url: String,
        #[source]
        source: BoxError,
    },

    /// Any other error the daemon answered with.
    #[error("{message} ({code})", code = code.as_str())]
    Api {
        code: ErrorCode,
        status: u16,
        message: String,
    },

    /// An image build or pull failed after it started: a step's command
    /// exited non-zero (`code` is `image_build_failed`, `exit_code` and the
    /// tail of its `output` are set), a registry failed (`registry_failed`),
    /// an unknown base (`not_found`), ...
    #[error("{message} ({}{})", code.as_str(), exit_note(message, *exit_code))]
    Build {
        code: ErrorCode,
        message: String,
        /// The failing command's exit code, when a command failed.
        exit_code: Option<i32>,
        /// The last lines the failing command printed, when a command failed.
        output: Option<String>,
    },

    /// A request the client refuses before sending anything: a bad image
    /// description (a relative or `..` destination, an unknown Python
    /// version), a local file that does not exist or cannot be read.
    #[error("{0}")]
    InvalidArgument(String),

    /// A bad client setting (daemon URL, token).
    #[error("{0}")]
    Config(String),

    /// The daemon answered something this client does not understand.
    #[error("protocol error: {0}")]
    Protocol(String),
}

/// `, exit code N` for a build error's message, unless it says so already.
fn exit_note(message: &str, exit_code: Option<i32>) -> String {
    match exit_code {
        Some(c) if !message.contains(&format!("exit code {c}")) => format!(", exit code {c}"),
        _ => String::new(),
    }
}

/// The innermost error's message ("Connection refused (os error 111)"):
/// hyper's own wrappers say only "client error (Connect)".
fn root_cause(e: &(dyn std::error::Error + 'static)) -> String {
    let mut cur = e;
    while let Some(next) = cur.source() {
        cur = next;
    }
    cur.to_string()
}

impl Error {
    /// The daemon's stable error code, when the daemon answered with one
    /// (`invalid_request` for [`Error::InvalidArgument`]).
    pub fn code(&self) -> Option<ErrorCode> {
        match self {
            Error::NotFound { .. } => Some(ErrorCode::NotFound),
            Error::Timeout { .. } => Some(ErrorCode::WaitTimeout),
            Error::Api { code, .. } | Error::Build { code, .. } => Some(*code),
            // What the daemon would have answered.
            Error::InvalidArgument(_) => Some(ErrorCode::InvalidRequest),
            Error::Unavailable { .. } | Error::Config(_) | Error::Protocol(_) => None,
        }
    }

    pub fn is_not_found(&self) -> bool {
        matches!(self, Error::NotFound { .. })
    }

    /// Whether an image build failed in one of its steps (a command exited
    /// non-zero, a package is unknown, ...), as opposed to not being able to
    /// reach a registry or the daemon.
    pub fn is_build_failure(&self) -> bool {
        matches!(
            self,
            Error::Build {
                code: ErrorCode::ImageBuildFailed,
                ..
            }
        )
    }

    /// Builds the error for an answer with an error status.
    pub(crate) fn from_response(status: u16, body: &[u8]) -> Error {
        match serde_json::from_slice::<gworker_api::ErrorBody>(body) {
            Ok(b) if b.error.code == ErrorCode::NotFound => Error::NotFound {
                message: b.error.message,
            },
            Ok(b) => Error::Api {
                code: b.error.code,
                status,
                message: b.error.message,
            },
            Err(_) => Error::Protocol(format!(
                "HTTP {status} with a body that is not an API error: {}",
                String::from_utf8_lossy(&body[..body.len().min(200)])
            )),
        }
    }
}
