//! Reading an origin body for the cache without ever buffering more than
//! `max_entry_size`: a body that turns out bigger streams on to the client
//! (what was read so far first, then the rest), uncached.

use std::collections::VecDeque;
use std::pin::Pin;
use std::task::{Context, Poll};
use std::time::Duration;

use bytes::{Bytes, BytesMut};
use http::response::Parts;
use http::{header, Response};
use http_body::{Body, Frame, SizeHint};
use http_body_util::BodyExt;

use crate::body::ProxyBody;

pub enum Collected {
    Whole(Parts, Bytes),
    /// Too big (or with trailers): the response, still whole, to stream.
    TooBig(Response<ProxyBody>),
    /// The body failed or stalled past `within`.
    Failed,
}

pub async fn collect(resp: Response<ProxyBody>, max: usize, within: Duration) -> Collected {
    let declared = resp
        .headers()
        .get(header::CONTENT_LENGTH)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.parse::<u64>().ok());
    if declared.is_some_and(|n| n > max as u64) {
        return Collected::TooBig(resp);
    }
    let (parts, mut body) = resp.into_parts();
    let mut buf = BytesMut::with_capacity(declared.unwrap_or(0) as usize);
    let read = async {
        loop {
            match body.frame().await {
                None => return Ok(None),
                Some(Err(_)) => return Err(()),
                Some(Ok(frame)) => match frame.into_data() {
                    Ok(data) => {
                        if buf.len() + data.len() > max {
                            return Ok(Some(Frame::data(data)));
                        }
                        buf.extend_from_slice(&data);
                    }
                    // Trailers: not stored; hand everything on.
                    Err(trailers) => return Ok(Some(trailers)),
                },
            }
        }
    };
    match tokio::time::timeout(within, read).await {
        Ok(Ok(None)) => Collected::Whole(parts, buf.freeze()),
        Ok(Ok(Some(overflow))) => {
            let mut frames = VecDeque::new();
            if !buf.is_empty() {
                frames.push_back(Frame::data(buf.freeze()));
            }
            frames.push_back(overflow);
            let rest = Prefixed { frames, rest: body };
            Collected::TooBig(Response::from_parts(
                parts,
                ProxyBody::boxed(rest.boxed_unsync()),
            ))
        }
        _ => Collected::Failed,
    }
}

/// Frames already read, then the rest of the body.
struct Prefixed {
    frames: VecDeque<Frame<Bytes>>,
    rest: ProxyBody,
}

impl Body for Prefixed {
    type Data = Bytes;
    type Error = crate::body::BodyError;

    fn poll_frame(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, crate::body::BodyError>>> {
        if let Some(f) = self.frames.pop_front() {
            return Poll::Ready(Some(Ok(f)));
        }
        Pin::new(&mut self.rest).poll_frame(cx)
    }

    fn is_end_stream(&self) -> bool {
        self.frames.is_empty() && self.rest.is_end_stream()
    }

    fn size_hint(&self) -> SizeHint {
        let buffered: u64 = self
            .frames
            .iter()
            .filter_map(|f| f.data_ref().map(|d| d.len() as u64))
            .sum();
        let rest = self.rest.size_hint();
        let mut hint = SizeHint::new();
        hint.set_lower(rest.lower() + buffered);
        if let Some(u) = rest.upper() {
            hint.set_upper(u + buffered);
        }
        hint
    }
}
