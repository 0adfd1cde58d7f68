//! Server glue for `google.cloud.speech.v1.Speech`, written by hand: the generated crate ships
//! only the client. `StreamingRecognize` is served; every other method answers UNIMPLEMENTED.

use std::convert::Infallible;
use std::future::Future;
use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll};

use googleapis_tonic_google_cloud_speech_v1::google::cloud::speech::v1::{
    StreamingRecognizeRequest, StreamingRecognizeResponse,
};
use tonic::codegen::{Body, BoxFuture, StdError, http};

const STREAMING_RECOGNIZE: &str = "/google.cloud.speech.v1.Speech/StreamingRecognize";
/// Requests carry at most ~25 KB of audio; leave room for a config with many phrase hints.
const MAX_REQUEST_BYTES: usize = 4 << 20;

pub type ResponseStream = Pin<
    Box<dyn tokio_stream::Stream<Item = Result<StreamingRecognizeResponse, tonic::Status>> + Send>,
>;

/// What the emulator implements.
pub trait Speech: Send + Sync + 'static {
    fn streaming_recognize(
        &self,
        request: tonic::Request<tonic::Streaming<StreamingRecognizeRequest>>,
    ) -> impl Future<Output = Result<tonic::Response<ResponseStream>, tonic::Status>> + Send;
}

/// A tower service routing gRPC requests to a [`Speech`] implementation.
pub struct SpeechService<T> {
    inner: Arc<T>,
}

impl<T> SpeechService<T> {
    pub fn new(inner: Arc<T>) -> Self {
        SpeechService { inner }
    }
}

impl<T> Clone for SpeechService<T> {
    fn clone(&self) -> Self {
        SpeechService {
            inner: Arc::clone(&self.inner),
        }
    }
}

impl<T> tonic::server::NamedService for SpeechService<T> {
    const NAME: &'static str = "google.cloud.speech.v1.Speech";
}

struct Streaming<T>(Arc<T>);

impl<T: Speech> tonic::server::StreamingService<StreamingRecognizeRequest> for Streaming<T> {
    type Response = StreamingRecognizeResponse;
    type ResponseStream = ResponseStream;
    type Future = BoxFuture<tonic::Response<ResponseStream>, tonic::Status>;

    fn call(
        &mut self,
        request: tonic::Request<tonic::Streaming<StreamingRecognizeRequest>>,
    ) -> Self::Future {
        let inner = Arc::clone(&self.0);
        Box::pin(async move { inner.streaming_recognize(request).await })
    }
}

impl<T, B> tonic::codegen::Service<http::Request<B>> for SpeechService<T>
where
    T: Speech,
    B: Body + Send + 'static,
    B::Error: Into<StdError> + Send + 'static,
{
    type Response = http::Response<tonic::body::Body>;
    type Error = Infallible;
    type Future = BoxFuture<Self::Response, Self::Error>;

    fn poll_ready(&mut self, _cx: &mut Context<'_>) -> Poll<Result<(), Self::Error>> {
        Poll::Ready(Ok(()))
    }

    fn call(&mut self, request: http::Request<B>) -> Self::Future {
        if request.uri().path() != STREAMING_RECOGNIZE {
            return Box::pin(async move {
                Ok(
                    tonic::Status::unimplemented("the emulator serves StreamingRecognize only")
                        .into_http(),
                )
            });
        }
        let inner = Arc::clone(&self.inner);
        Box::pin(async move {
            let codec = tonic_prost::ProstCodec::<
                StreamingRecognizeResponse,
                StreamingRecognizeRequest,
            >::default();
            let mut grpc = tonic::server::Grpc::new(codec)
                .apply_max_message_size_config(Some(MAX_REQUEST_BYTES), None);
            Ok(grpc.streaming(Streaming(inner), request).await)
        })
    }
}
