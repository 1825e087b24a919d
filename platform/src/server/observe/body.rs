//! The response and request bodies of an observed call: the messages counted (and logged at TRACE),
//! and the status that ends the call.

use std::{
    collections::HashSet,
    pin::Pin,
    sync::Arc,
    task::{Context, Poll},
};

use bytes::Bytes;
use http_body::{Body, Frame, SizeHint};
use pin_project_lite::pin_project;
use prost_reflect::{DynamicMessage, MessageDescriptor, SerializeOptions};
use tonic::Code;
use tracing::Level;

use super::{Observed, RpcCall, status_code};

pin_project! {
    /// The response body, whose messages are counted and whose trailers end the call.
    pub struct ObservedBody<B> {
        #[pin]
        pub(super) inner: B,
        pub(super) call: Option<RpcCall>,
        pub(super) messages: MessageCounter,
        pub(super) tap: Option<Box<MessageTap>>,
    }
}

impl<B: Body<Data = Bytes>> Body for ObservedBody<B> {
    type Data = Bytes;
    type Error = B::Error;

    fn poll_frame(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Self::Data>, Self::Error>>> {
        let this = self.project();
        let frame = {
            // A streaming handler does its work as its messages are polled: in the call's span.
            let _in_span = this.call.as_ref().map(|call| call.span.enter());
            this.inner.poll_frame(cx)
        };
        match &frame {
            Poll::Ready(Some(Ok(frame))) => {
                if let Some(call) = this.call.as_ref()
                    && (call.observed.metrics.is_some() || this.tap.is_some())
                    && let Some(data) = frame.data_ref()
                {
                    let sent = this.messages.count(data, this.tap.as_deref_mut());
                    if let Some(metrics) = &call.observed.metrics {
                        metrics.sent(sent);
                    }
                }
                if let Some(trailers) = frame.trailers_ref()
                    && let Some(call) = this.call.take()
                {
                    call.finish(status_code(trailers).unwrap_or(Code::Unknown));
                }
            }
            Poll::Ready(Some(Err(_)) | None) => {
                if let Some(call) = this.call.take() {
                    call.finish(Code::Unknown);
                }
            }
            Poll::Pending => {}
        }
        frame
    }

    fn is_end_stream(&self) -> bool {
        self.inner.is_end_stream()
    }

    fn size_hint(&self) -> SizeHint {
        self.inner.size_hint()
    }
}

impl<B: Default> Default for ObservedBody<B> {
    fn default() -> Self {
        Self {
            inner: B::default(),
            call: None,
            messages: MessageCounter::default(),
            tap: None,
        }
    }
}

pin_project! {
    /// The request body, whose messages are counted as they arrive (when metrics are on).
    pub struct CountedBody<B> {
        #[pin]
        pub(super) inner: B,
        pub(super) messages: MessageCounter,
        pub(super) observed: Option<Arc<Observed>>,
        pub(super) tap: Option<Box<MessageTap>>,
    }
}

impl<B: Body<Data = Bytes>> Body for CountedBody<B> {
    type Data = Bytes;
    type Error = B::Error;

    #[inline]
    fn poll_frame(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Self::Data>, Self::Error>>> {
        let this = self.project();
        let frame = this.inner.poll_frame(cx);
        if let Poll::Ready(Some(Ok(frame))) = &frame
            && let Some(observed) = this.observed.as_ref()
            && let Some(data) = frame.data_ref()
        {
            let received = this.messages.count(data, this.tap.as_deref_mut());
            if let Some(metrics) = &observed.metrics {
                metrics.received(received);
            }
        }
        frame
    }

    fn is_end_stream(&self) -> bool {
        self.inner.is_end_stream()
    }

    fn size_hint(&self) -> SizeHint {
        self.inner.size_hint()
    }
}

/// Counts the gRPC messages in a body from its data frames, which split and join messages at will:
/// each message is a 5-byte prefix (compression flag, big-endian length) and its bytes.
#[derive(Debug, Default)]
pub(super) struct MessageCounter {
    /// Bytes of the current prefix read so far (0 to 4).
    prefix_read: u8,
    /// Whether the current message is compressed (its prefix's flag).
    compressed: bool,
    /// The length being read from the prefix.
    length: u32,
    /// Bytes of the current message still to come.
    remaining: u32,
}

impl MessageCounter {
    /// Reads `data` and returns how many messages it completed, handing each message's bytes to
    /// `tap` when there is one.
    pub(super) fn count(&mut self, mut data: &[u8], mut tap: Option<&mut MessageTap>) -> u64 {
        let mut completed = 0;
        while !data.is_empty() {
            if self.remaining > 0 {
                let taken = data
                    .len()
                    .min(usize::try_from(self.remaining).unwrap_or(usize::MAX));
                if let Some(tap) = tap.as_deref_mut() {
                    tap.buffer.extend_from_slice(&data[..taken]);
                }
                data = &data[taken..];
                self.remaining -= u32::try_from(taken).unwrap_or(self.remaining);
                if self.remaining == 0 {
                    completed += 1;
                    if let Some(tap) = tap.as_deref_mut() {
                        tap.log(self.compressed);
                    }
                }
                continue;
            }
            let byte = data[0];
            data = &data[1..];
            if self.prefix_read == 0 {
                self.compressed = byte != 0;
            } else {
                self.length = (self.length << 8) | u32::from(byte);
            }
            self.prefix_read += 1;
            if self.prefix_read == 5 {
                self.remaining = std::mem::take(&mut self.length);
                self.prefix_read = 0;
                if self.remaining == 0 {
                    completed += 1;
                    if let Some(tap) = tap.as_deref_mut() {
                        tap.log(self.compressed);
                    }
                }
            }
        }
        completed
    }
}

/// The target of the request and response messages, logged at TRACE.
pub const MESSAGES_TARGET: &str = "app::messages";

/// Logs one direction's messages of a call at TRACE, as proto JSON without the redacted fields'
/// values. Exists only while TRACE is on for `app::messages`.
pub(super) struct MessageTap {
    pub(super) observed: Arc<Observed>,
    pub(super) descriptor: MessageDescriptor,
    pub(super) direction: &'static str,
    pub(super) redacted: Arc<HashSet<String>>,
    /// The current message's bytes so far.
    pub(super) buffer: Vec<u8>,
}

impl MessageTap {
    /// Logs the message in `buffer`, and empties it.
    fn log(&mut self, compressed: bool) {
        let message = if compressed {
            format!("(compressed, {} bytes)", self.buffer.len())
        } else {
            match DynamicMessage::decode(self.descriptor.clone(), self.buffer.as_slice()) {
                Ok(message) => {
                    let options = SerializeOptions::new().use_proto_field_name(true);
                    match message.serialize_with_options(serde_json::value::Serializer, &options) {
                        Ok(mut json) => {
                            redact(&mut json, &self.redacted);
                            json.to_string()
                        }
                        Err(err) => format!("(cannot render: {err})"),
                    }
                }
                Err(err) => format!("(undecodable, {} bytes: {err})", self.buffer.len()),
            }
        };
        self.buffer.clear();
        tracing::event!(target: MESSAGES_TARGET, Level::TRACE,
            rpc.service = &*self.observed.service, rpc.method = &*self.observed.method,
            direction = self.direction, message, "message");
    }
}

/// Replaces the values of the `redacted` fields, at any depth, with `"[REDACTED]"`.
pub(super) fn redact(json: &mut serde_json::Value, redacted: &HashSet<String>) {
    match json {
        serde_json::Value::Object(fields) => {
            for (name, value) in fields.iter_mut() {
                if redacted.contains(name) {
                    *value = serde_json::Value::from("[REDACTED]");
                } else {
                    redact(value, redacted);
                }
            }
        }
        serde_json::Value::Array(items) => {
            for item in items {
                redact(item, redacted);
            }
        }
        _ => {}
    }
}
