//! The fakes' knobs for backpressure tests, against the real service: a caller and a model
//! that stop reading their sockets, and a flood of model audio.

mod support;

use support::{openai_settings, spawn_app, test_settings, tone_frames, FakeOpenAi, FakeTwilio};

/// While the fake caller's reader is paused, nothing the service sends is read, though the
/// service has sent it; resumed, all of it arrives, in order.
#[actix_web::test]
async fn the_fake_caller_can_stop_reading() {
    let app = spawn_app(test_settings()).await;
    let caller = FakeTwilio::connect(&app.ws_url()).await;
    caller.start_call("MZ900", "CA900", &[]).await;
    caller.pause_reading();
    assert!(caller.is_reading_paused());
    let frames = tone_frames(10);
    for frame in &frames {
        caller.send_media(frame).await;
    }
    // The echo upstream has sent every frame back: the caller just did not read them.
    app.wait_call("CA900", "every frame echoed", |c| c["frames_out"] == 10)
        .await;
    assert_eq!(caller.media_count(), 0);
    assert!(caller.events().is_empty());

    caller.resume_reading();
    assert_eq!(caller.recv_audio_bytes(1600).await, frames.concat());
    caller.hang_up().await;
    caller.assert_no_violations();
}

/// A flood of model audio reaches the caller whole, and the service reads what the model's
/// session receives while the session's reader is paused only once it resumes.
#[actix_web::test]
async fn a_flood_reaches_the_caller_and_a_paused_model_reads_late() {
    let fake = FakeOpenAi::start().await;
    let app = spawn_app(openai_settings(&fake)).await;
    let caller = FakeTwilio::connect(&app.ws_url()).await;
    let mut session = fake.next_session().await;
    caller.start_call("MZ901", "CA901", &[]).await;
    session.recv_event("session.update").await;

    session.start_response("resp_1", "item_1");
    // Two seconds of audio: within what the service forwards ahead of playback.
    let flood = session.flood_audio("resp_1", "item_1", 16_000, 1_000);
    assert_eq!(flood.wait_written(16_000).await, 16_000);
    assert_eq!(caller.recv_audio_bytes(16_000).await.len(), 16_000);
    session.finish_response("resp_1", "item_1", "");
    assert!(flood.is_finished());

    session.pause_reading();
    let read = session.bytes_read();
    let frames = tone_frames(5);
    for frame in &frames {
        caller.send_media(frame).await;
    }
    app.wait_call("CA901", "caller audio taken in", |c| c["frames_in"] == 5)
        .await;
    assert_eq!(session.bytes_read(), read);
    session.resume_reading();
    assert_eq!(session.wait_appended_bytes(800).await, frames.concat());
    caller.hang_up().await;
    caller.assert_no_violations();
    session.assert_no_violations();
}
