//! Ledger commands: transactions signed with the user's key, sent to a node, and followed until
//! the chain finalizes them.

use std::time::{Duration, Instant};

use anyhow::{Context, Result, bail};
use clap::Args;
use serde_json::{Value, json};
use vouch_client::Client;
use vouch_crypto::{Digest, PublicKey, SecretKey};
use vouch_ledger::{Transaction, TxBody};

/// How long a command waits for its transaction to be finalized.
pub(crate) const FINALITY_TIMEOUT: Duration = Duration::from_secs(120);
/// How often it asks.
const POLL_INTERVAL: Duration = Duration::from_millis(100);

/// A transaction sent: its id and the nonce it used.
pub(crate) struct Sent {
    pub id: Digest,
    pub nonce: u64,
}

fn field<'a>(value: &'a Value, name: &str) -> Result<&'a Value> {
    value
        .get(name)
        .with_context(|| format!("the node's answer has no '{name}'"))
}

fn u64_field(value: &Value, name: &str) -> Result<u64> {
    field(value, name)?
        .as_u64()
        .with_context(|| format!("the node's '{name}' is not a number"))
}

/// Signs `body` with `key` at the account's next nonce and the chain's minimum fee, and submits
/// it to the node.
pub(crate) async fn submit(client: &Client, key: &SecretKey, body: TxBody) -> Result<Sent> {
    let status = client.chain_status().await?;
    let chain_id: Digest = field(&status, "chain_id")?
        .as_str()
        .and_then(|text| text.parse().ok())
        .context("the node's chain id is not a digest")?;
    let fee = u64_field(&status, "min_fee")?;
    let account = client.chain_account(&key.public_key()).await?;
    let nonce = u64_field(&account, "nonce")?;
    let tx = Transaction {
        signer: key.public_key(),
        nonce,
        fee,
        body,
    }
    .sign(key, &chain_id);
    client.submit_transaction(tx.encode()).await?;
    Ok(Sent { id: tx.id(), nonce })
}

/// Waits until the account has used `nonce`, which happens when its transaction is finalized.
pub(crate) async fn wait_finalized(client: &Client, signer: &PublicKey, sent: &Sent) -> Result<u64> {
    let started = Instant::now();
    loop {
        let account = client.chain_account(signer).await?;
        if u64_field(&account, "nonce")? > sent.nonce {
            return u64_field(&account, "height");
        }
        if started.elapsed() > FINALITY_TIMEOUT {
            bail!(
                "transaction {} was not finalized within {} s (refused when its block was built, or the chain is stalled)",
                sent.id,
                FINALITY_TIMEOUT.as_secs()
            );
        }
        tokio::time::sleep(POLL_INTERVAL).await;
    }
}

/// `vouch account [PUBLIC_KEY]`.
#[derive(Debug, Args)]
pub(crate) struct AccountArgs {
    /// The account (default: the public key of --key).
    pub public_key: Option<PublicKey>,
}

/// `vouch transfer TO AMOUNT`.
#[derive(Debug, Args)]
pub(crate) struct TransferArgs {
    /// The receiving account's public key.
    pub to: PublicKey,
    /// How much moves.
    pub amount: u64,
}

/// `vouch stake AMOUNT --address HOST:PORT`.
#[derive(Debug, Args)]
pub(crate) struct StakeArgs {
    /// Stake added (moved from the balance).
    pub amount: u64,
    /// Where this node's HTTP API answers (default: the address already registered).
    #[arg(long)]
    pub address: Option<String>,
    /// Start unbonding AMOUNT instead; it returns to the balance after the unbonding delay.
    #[arg(long)]
    pub unstake: bool,
}

/// Prints an account (with its node registration, if any).
pub(crate) async fn account(client: &Client, who: PublicKey, json: bool) -> Result<()> {
    let account = client.chain_account(&who).await?;
    if json {
        println!("{}", serde_json::to_string_pretty(&account)?);
        return Ok(());
    }
    println!("account: {who}");
    println!("balance: {}", u64_field(&account, "balance")?);
    println!("nonce:   {}", u64_field(&account, "nonce")?);
    if let Some(node) = account.get("node").filter(|node| !node.is_null()) {
        println!("stake:   {}", u64_field(node, "stake")?);
        if let Some(address) = node.get("address").and_then(Value::as_str) {
            println!("address: {address}");
        }
    }
    println!("height:  {}", u64_field(&account, "height")?);
    Ok(())
}

/// Sends `body`, waits for finality, and reports it.
pub(crate) async fn send_and_wait(
    client: &Client,
    key: &SecretKey,
    body: TxBody,
    what: &str,
    json: bool,
) -> Result<()> {
    let sent = submit(client, key, body).await?;
    let height = wait_finalized(client, &key.public_key(), &sent).await?;
    if json {
        println!(
            "{}",
            serde_json::to_string_pretty(&json!({ "transaction": sent.id, "nonce": sent.nonce, "height": height }))?
        );
    } else {
        println!("{what}: transaction {} finalized by height {height}", sent.id);
    }
    Ok(())
}

/// `vouch stake`: registers or tops up the node, or starts unbonding.
pub(crate) async fn stake(client: &Client, key: &SecretKey, args: &StakeArgs, json: bool) -> Result<()> {
    if args.unstake {
        let body = TxBody::Unstake { amount: args.amount };
        return send_and_wait(client, key, body, "unstaking", json).await;
    }
    let account = client.chain_account(&key.public_key()).await?;
    let node = account.get("node").filter(|node| !node.is_null());
    let registered = node.and_then(|node| node.get("address")).and_then(Value::as_str);
    let address = match (&args.address, registered) {
        (Some(address), _) => address.clone(),
        (None, Some(address)) => address.to_string(),
        (None, None) => bail!("a first stake registers a node: pass --address HOST:PORT (its HTTP API)"),
    };
    let body = TxBody::RegisterNode {
        stake: args.amount,
        address,
        models: Vec::new(),
    };
    send_and_wait(client, key, body, "staked", json).await
}

/// `vouch task show ID`.
pub(crate) async fn show_task(client: &Client, id: &Digest, json: bool) -> Result<()> {
    let answer = client.chain_task(id).await?;
    if json {
        println!("{}", serde_json::to_string_pretty(&answer)?);
        return Ok(());
    }
    let task = field(&answer, "task")?;
    println!("task:      {id}");
    for name in ["status", "model_id", "max_fee", "deadline", "requester"] {
        if let Some(value) = task.get(name) {
            let text = value.as_str().map_or_else(|| value.to_string(), str::to_string);
            println!("{:<10} {text}", format!("{name}:"));
        }
    }
    if let Some(executors) = task.get("executors").and_then(Value::as_array) {
        println!("executors: {}", executors.len());
        for executor in executors {
            println!("  {}", executor.as_str().unwrap_or_default());
        }
    }
    if let Some(receipts) = task.get("receipts").and_then(Value::as_array) {
        println!("receipts:  {}", receipts.len());
    }
    println!("height:    {}", u64_field(&answer, "height")?);
    Ok(())
}
