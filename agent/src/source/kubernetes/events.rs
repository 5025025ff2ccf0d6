//! Kubernetes Events on Services this node cannot program, saying why (`kubectl describe
//! service` shows them). Posted through kube-rs's [`Recorder`] as `events.k8s.io/v1` Events from
//! reporting controller `kube-ipvs-bpf`, instance = the node name; deduplicated so a sync loop
//! can call [`ServiceEvents::warn`] on every sync without flooding the API server.

use std::collections::{BTreeSet, HashMap};
use std::sync::{Mutex, PoisonError};
use std::time::{Duration, Instant};

use k8s_openapi::api::core::v1::ObjectReference;
use kube::Client;
use kube::runtime::events::{Event, EventType, Recorder, Reporter};

use crate::model::{Rejection, ServiceRef};
use crate::source::Snapshot;

/// The `reportingController` of our Events.
pub const REPORTING_CONTROLLER: &str = "kube-ipvs-bpf";

/// The Event's `action`.
const ACTION: &str = "Program";

/// Longest Event note the API server accepts.
const MAX_NOTE: usize = 1024;

/// The uid of `service` in `snapshot`, for [`ServiceEvents::warn`].
pub fn service_uid<'a>(snapshot: &'a Snapshot, service: &ServiceRef) -> Option<&'a str> {
    snapshot
        .services
        .get(&service.namespace, &service.name)
        .and_then(|s| s.uid.as_deref())
}

/// A Warning Event to post about a rejected Service.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RejectionWarning {
    pub service: ServiceRef,
    pub uid: Option<String>,
    /// The rejection's reason, the Event's note.
    pub message: String,
}

/// The Event `reason` of [`RejectionWarning`]s.
pub const REJECTION_REASON: &str = "Invalid";

/// The Services the model rejected (wholly or in part: an address not programmed) and the
/// Warnings to post about them: one per rejection of a Service not in `before` (those were
/// reported already). The returned set is the next call's `before`; Services that left it
/// should be [`ServiceEvents::resolved`].
pub fn rejection_warnings(
    snapshot: &Snapshot,
    rejected: &[Rejection],
    before: &BTreeSet<ServiceRef>,
) -> (BTreeSet<ServiceRef>, Vec<RejectionWarning>) {
    let mut services = BTreeSet::new();
    let mut warnings = Vec::new();
    for r in rejected {
        let Some((ns, n)) = r
            .object
            .strip_prefix("Service ")
            .and_then(|name| name.split_once('/'))
        else {
            continue;
        };
        let service = ServiceRef::new(ns, n);
        if !before.contains(&service) {
            warnings.push(RejectionWarning {
                uid: service_uid(snapshot, &service).map(str::to_string),
                service: service.clone(),
                message: r.reason.clone(),
            });
        }
        services.insert(service);
    }
    (services, warnings)
}

/// The last Event posted about one Service.
struct Posted {
    reason: String,
    message: String,
    at: Instant,
    /// Its recorder: a repeat of the same Event through it becomes a series (count + 1).
    recorder: Recorder,
}

/// Posts Warning Events about Services, each distinct (reason, message) once per Service (and
/// again after `repeat_after` if it still holds).
pub struct ServiceEvents {
    client: Client,
    reporter: Reporter,
    repeat_after: Duration,
    posted: Mutex<HashMap<ServiceRef, Posted>>,
}

fn truncate(s: &str, max: usize) -> &str {
    if s.len() <= max {
        return s;
    }
    let mut end = max;
    while !s.is_char_boundary(end) {
        end -= 1;
    }
    &s[..end]
}

impl ServiceEvents {
    /// Events reported by this node (`reportingInstance`), repeated at most hourly.
    pub fn new(client: Client, node_name: &str) -> Self {
        Self::with_repeat(client, node_name, Duration::from_secs(3600))
    }

    pub fn with_repeat(client: Client, node_name: &str, repeat_after: Duration) -> Self {
        Self {
            client,
            reporter: Reporter {
                controller: REPORTING_CONTROLLER.to_string(),
                instance: Some(node_name.to_string()),
            },
            repeat_after,
            posted: Mutex::new(HashMap::new()),
        }
    }

    /// Posts a Warning Event on `service` (with its `uid` when known, which `kubectl describe`
    /// matches on), unless the same reason and message were posted for it already. Returns
    /// whether an Event was posted; a failure to post is logged, not retried before
    /// `repeat_after`.
    pub async fn warn(
        &self,
        service: &ServiceRef,
        uid: Option<&str>,
        reason: &str,
        message: &str,
    ) -> bool {
        let message = truncate(message, MAX_NOTE);
        let recorder = {
            let mut posted = self.posted.lock().unwrap_or_else(PoisonError::into_inner);
            let same = posted
                .get(service)
                .filter(|p| p.reason == reason && p.message == message);
            if same.is_some_and(|p| p.at.elapsed() < self.repeat_after) {
                return false;
            }
            let recorder = match same {
                Some(p) => p.recorder.clone(),
                // A new message needs a new recorder: kube's recorder keys its cache on the
                // reason, not the note, and would patch the old note's Event.
                None => Recorder::new(self.client.clone(), self.reporter.clone()),
            };
            posted.insert(
                service.clone(),
                Posted {
                    reason: reason.to_string(),
                    message: message.to_string(),
                    at: Instant::now(),
                    recorder: recorder.clone(),
                },
            );
            recorder
        };
        let reference = ObjectReference {
            api_version: Some("v1".into()),
            kind: Some("Service".into()),
            namespace: Some(service.namespace.clone()),
            name: Some(service.name.clone()),
            uid: uid.map(str::to_string),
            ..ObjectReference::default()
        };
        let event = Event {
            type_: EventType::Warning,
            reason: reason.to_string(),
            note: Some(message.to_string()),
            action: ACTION.to_string(),
            secondary: None,
        };
        match recorder.publish(&event, &reference).await {
            Ok(()) => true,
            Err(e) => {
                tracing::warn!(service = %service, reason, error = %e, "posting a Kubernetes Event failed");
                false
            }
        }
    }

    /// Posts each of `warnings` ([`rejection_warnings`]) as a Warning Event with reason
    /// [`REJECTION_REASON`]; returns how many were posted.
    pub async fn post_rejections(&self, warnings: &[RejectionWarning]) -> usize {
        let mut posted = 0;
        for w in warnings {
            if self
                .warn(&w.service, w.uid.as_deref(), REJECTION_REASON, &w.message)
                .await
            {
                posted += 1;
            }
        }
        posted
    }

    /// Forgets what was posted about `service` (it can be programmed again): a later failure
    /// is reported anew.
    pub fn resolved(&self, service: &ServiceRef) {
        self.posted
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .remove(service);
    }

    /// Forgets every Service but those `still_failing` keeps.
    pub fn retain(&self, mut still_failing: impl FnMut(&ServiceRef) -> bool) {
        self.posted
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .retain(|s, _| still_failing(s));
    }
}
