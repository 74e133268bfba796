//! The signup saga end to end: a node and both participants against real RabbitMQ and
//! PostgreSQL (`testkit::TestEnv`: a fresh database and AMQP namespace per test).

use std::time::Duration;

use sagas::SagaStatus;
use sagas::protocol::StartRequest;
use testkit::{TestEnv, wait};

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_signup_opens_an_account_and_a_refused_mail_closes_it_again() {
    let env = TestEnv::start().await.unwrap();
    your_first_saga::setup(&env.pool).await.unwrap();
    let node = env.orchestrator("node-1", your_first_saga::registry().unwrap()).await.unwrap();
    let accounts = your_first_saga::accounts(env.participant_config()).unwrap().start(env.pool.clone(), &env.amqp_url).await.unwrap();
    let mail = your_first_saga::mail(env.participant_config()).unwrap().start(env.pool.clone(), &env.amqp_url).await.unwrap();

    let start = |email: &str| StartRequest {
        definition: "signup".into(),
        version: None,
        input: serde_json::json!({ "email": email }),
        idempotency_key: None,
        saga_id: None,
        priority: None,
    };
    let ok = node.engine().start(&start("ada@example.org"), None).await.unwrap().saga_id;
    let bounced = node.engine().start(&start("bob@bounce.example"), None).await.unwrap().saga_id;
    let states = wait::all_settled(&env.pool, &[ok, bounced], Duration::from_secs(60)).await.unwrap();
    assert_eq!((states[0].status, states[1].status), (SagaStatus::Completed, SagaStatus::Compensated));

    let emails: Vec<String> = sqlx::query_scalar("SELECT email FROM accounts").fetch_all(&env.pool).await.unwrap();
    assert_eq!(emails, ["ada@example.org"], "the bounced signup's account was closed again");
    let mails: Vec<String> = sqlx::query_scalar("SELECT account_email FROM welcome_mails").fetch_all(&env.pool).await.unwrap();
    assert_eq!(mails, ["ada@example.org"]);

    accounts.shutdown().await.unwrap();
    mail.shutdown().await.unwrap();
    node.shutdown().await.unwrap();
    env.cleanup(&["accounts", "mail"]).await.unwrap();
}
