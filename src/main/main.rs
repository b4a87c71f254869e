//! `cdp`: one binary, one subcommand per stage, plus `dev`, `topics` and
//! `config`. See README.md for the full reference. The command line is in
//! [`cli`], the long-running commands in [`serve`], the one-shot ones in
//! [`tools`] (and the library's `cdp::topics`).

mod cli;
mod serve;
mod tools;

use std::process::ExitCode;

use cdp::stages::Stage;
use clap::Parser;

use cli::{
    Cli, Command, ConfigCommand, DeadLettersCommand, DestinationsCommand, LogFormat,
    ProfilesCommand, TopicsCommand,
};

fn init_logging(format: LogFormat) {
    let filter = tracing_subscriber::EnvFilter::try_from_env("CDP_LOG").unwrap_or_else(|_| {
        tracing_subscriber::EnvFilter::new("info,rdkafka=warn,librdkafka=warn")
    });
    let builder = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr);
    match format {
        LogFormat::Text => builder.init(),
        LogFormat::Json => {
            builder.json().init();
            cdp::notice::logs_are_json(true);
        }
    }
}

#[tokio::main]
async fn main() -> ExitCode {
    let cli = Cli::parse();
    init_logging(cli.log_format);
    match run(cli.command).await {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            cdp::notice::fail(&e);
            ExitCode::FAILURE
        }
    }
}

/// Run one subcommand.
async fn run(command: Command) -> anyhow::Result<()> {
    match command {
        Command::Dev {
            config,
            demo,
            listen,
            admin_listen,
            state_dir,
        } => {
            serve::dev(serve::DevFlags {
                config,
                demo,
                listen,
                admin_listen,
                state_dir,
            })
            .await
        }
        Command::Collect {
            conn,
            admin,
            listen,
        } => serve::collect(conn, admin, listen).await,
        Command::Validate(c) => serve::stage(Stage::Validate, c).await,
        Command::Identity(c) => serve::stage(Stage::Identity, c).await,
        Command::Traits(c) => serve::stage(Stage::Traits, c).await,
        Command::Audiences(c) => serve::stage(Stage::Audiences, c).await,
        Command::Deliver(c) => serve::stage(Stage::Deliver, c).await,
        Command::MockBroker {
            prefixes,
            partitions,
        } => serve::mock_broker(prefixes, partitions).await,
        Command::DeadLetters {
            command:
                DeadLettersCommand::List {
                    common,
                    selection,
                    json,
                },
        } => tools::list_dead_letters(common, selection, json).await,
        Command::DeadLetters {
            command:
                DeadLettersCommand::Replay {
                    common,
                    selection,
                    dry_run,
                },
        } => tools::replay_dead_letters(common, selection, dry_run).await,
        Command::Profiles {
            command: ProfilesCommand::Traits { common, profile },
        } => tools::profile_traits(common, profile).await,
        Command::Profiles {
            command:
                ProfilesCommand::Audiences {
                    common,
                    profile,
                    audience,
                },
        } => tools::profile_audiences(common, profile, audience).await,
        Command::Destinations {
            command:
                DestinationsCommand::Sync {
                    common,
                    destination,
                    audience,
                    dry_run,
                },
        } => {
            let opts = cdp::sync::SyncOptions {
                destination,
                audience,
                dry_run,
            };
            tools::sync_destination(common, opts).await
        }
        Command::Topics { command } => {
            let (TopicsCommand::Create(c) | TopicsCommand::Check(c) | TopicsCommand::Sizes(c)) =
                &command;
            let (compiled, factory) = c.open()?;
            match command {
                TopicsCommand::Create(_) => cdp::topics::create(&compiled, &factory).await,
                TopicsCommand::Check(_) => cdp::topics::check(&compiled, &factory).await,
                TopicsCommand::Sizes(_) => cdp::topics::sizes(&compiled, &factory).await,
            }
        }
        Command::Loadgen(args) => tools::loadgen(args).await,
        Command::Passthrough {
            common,
            from,
            to,
            expect,
            idle,
        } => {
            let opts = cdp::passthrough::HopOptions {
                from,
                to,
                expect,
                idle: idle.to_std(),
            };
            tools::passthrough(common, opts).await
        }
        Command::Stamps {
            common,
            topics,
            since_ms,
        } => {
            let opts = cdp::stamps::StampOptions {
                topics,
                since_ms,
                patience: std::time::Duration::from_secs(30),
            };
            tools::stamps(common, opts).await
        }
        Command::Config {
            command: ConfigCommand::Check { file, config },
        } => tools::check_config(file, config),
        Command::Config {
            command: ConfigCommand::Schema,
        } => {
            println!(
                "{}",
                serde_json::to_string_pretty(&cdp::config::config_schema())?
            );
            Ok(())
        }
    }
}
