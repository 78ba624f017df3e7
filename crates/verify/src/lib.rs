//! Check claims about inferences: a receipt against the model, plan, inputs and outputs it names, by re-executing the exact plan.
//!
//! Everything here is a pure function over data the caller already holds; fetching it (from a
//! node, from files) is the caller's business. A node uses [`run_exact`] and [`tensors_hash`] to
//! make the claims it signs, and a verifier uses the same functions to check them, so the two
//! cannot drift apart.

use vouch_crypto::Digest;
use vouch_engine::{EngineError, ExecOptions, Plan, PlanLimits, TraceTree, execute};
use vouch_tensor::{NamedTensor, hash_named_tensors};
use vouch_types::{BlobId, Manifest, ModelId, Receipt, ReceiptError, TensorSpec, VerifyLevel, request_hash};

/// Why a claim does not hold. Each message names the one thing that differs.
#[derive(Debug, thiserror::Error)]
pub enum VerifyError {
    /// The receipt is inconsistent or its signature does not verify.
    #[error(transparent)]
    Receipt(#[from] ReceiptError),
    /// The manifest at hand is not the model the receipt names.
    #[error("model id differs: the receipt names {receipt}, the manifest is {manifest}")]
    ModelMismatch {
        /// What the receipt says.
        receipt: ModelId,
        /// The manifest's id.
        manifest: ModelId,
    },
    /// The receipt names a plan its model does not list.
    #[error("plan {plan} is not an exact plan of model {model}")]
    PlanNotInModel {
        /// The plan.
        plan: BlobId,
        /// The model.
        model: ModelId,
    },
    /// The plan bytes at hand are not the plan the receipt names, or do not decode.
    #[error("plan {plan}: {reason}")]
    Plan {
        /// The plan.
        plan: BlobId,
        /// What is wrong.
        reason: String,
    },
    /// A level-`none` receipt names no plan, so there is nothing to re-execute.
    #[error("the receipt is at level none (float): it names no exact plan to re-execute")]
    NothingToReexecute,
    /// The inputs do not fit the model.
    #[error("input '{name}': {reason}")]
    Input {
        /// The input.
        name: String,
        /// What is wrong.
        reason: String,
    },
    /// One of the hashes the receipt commits to differs from the one computed here.
    #[error("{what} differs: the receipt says {receipt}, {source_of_computed} gives {computed}")]
    Mismatch {
        /// `input hash`, `output hash`, `trace root` or `request hash`.
        what: &'static str,
        /// What the receipt says.
        receipt: Digest,
        /// What was computed.
        computed: Digest,
        /// Where the computed value came from.
        source_of_computed: &'static str,
    },
    /// The exact plan failed to run on the inputs.
    #[error("re-execution failed: {0}")]
    Execution(#[from] EngineError),
}

/// The answer of an exact run, with the commitments a receipt makes about it.
#[derive(Debug, Clone)]
pub struct ExactAnswer {
    /// The dequantized outputs, named and ordered as the plan's outputs.
    pub outputs: Vec<NamedTensor>,
    /// [`tensors_hash`] of the outputs.
    pub output_hash: Digest,
    /// The Merkle root over every value the plan computed.
    pub trace_root: Digest,
}

/// The hash of named tensors that receipts call an input or output hash.
pub fn tensors_hash(tensors: &[NamedTensor]) -> Digest {
    Digest::from_bytes(hash_named_tensors(
        tensors.iter().map(|t| (t.name.as_deref().unwrap_or(""), &t.tensor)),
    ))
}

/// Names and orders inputs as the model declares them: a tensor given by name goes to that input,
/// an unnamed one to a model's only input. An unknown, missing or repeated input is an error.
pub fn name_inputs(specs: &[TensorSpec], inputs: Vec<NamedTensor>) -> Result<Vec<NamedTensor>, VerifyError> {
    let expected = || {
        specs
            .iter()
            .map(|s| format!("'{}'", s.name))
            .collect::<Vec<_>>()
            .join(", ")
    };
    if specs.len() == 1 && inputs.len() == 1 && inputs[0].name.is_none() {
        let tensor = inputs.into_iter().map(|t| t.tensor).collect::<Vec<_>>();
        return Ok(specs
            .iter()
            .zip(tensor)
            .map(|(spec, tensor)| NamedTensor {
                name: Some(spec.name.clone()),
                tensor,
            })
            .collect());
    }
    let mut slots: Vec<Option<NamedTensor>> = vec![None; specs.len()];
    for input in inputs {
        let name = input.name.clone().ok_or_else(|| VerifyError::Input {
            name: "(unnamed)".into(),
            reason: format!(
                "an unnamed tensor fits only a model with one input; this one takes {}",
                expected()
            ),
        })?;
        let Some(index) = specs.iter().position(|s| s.name == name) else {
            return Err(VerifyError::Input {
                reason: format!("the model has no such input; it takes {}", expected()),
                name,
            });
        };
        if slots[index].replace(input).is_some() {
            return Err(VerifyError::Input {
                name,
                reason: "given twice".into(),
            });
        }
    }
    specs
        .iter()
        .zip(slots)
        .map(|(spec, slot)| {
            slot.ok_or_else(|| VerifyError::Input {
                name: spec.name.clone(),
                reason: "missing".into(),
            })
        })
        .collect()
}

/// Runs an exact plan and computes the output hash and trace root a receipt commits to.
pub fn run_exact(plan: &Plan, inputs: &[NamedTensor], options: &ExecOptions) -> Result<ExactAnswer, VerifyError> {
    let execution = execute(plan, inputs, options).map_err(EngineError::from)?;
    let trace_root = Digest::from_bytes(TraceTree::new(&execution.values).root());
    Ok(ExactAnswer {
        output_hash: tensors_hash(&execution.outputs),
        outputs: execution.outputs,
        trace_root,
    })
}

/// Checks that `receipt` is signed by its executor and speaks of `manifest`'s model, and, at level
/// `reexec`, that it names one of the model's plans (returned).
pub fn check_receipt_model(receipt: &Receipt, manifest: &Manifest) -> Result<Option<BlobId>, VerifyError> {
    receipt.check_signature()?;
    let manifest_id = manifest.id();
    if receipt.body.model_id != manifest_id {
        return Err(VerifyError::ModelMismatch {
            receipt: receipt.body.model_id,
            manifest: manifest_id,
        });
    }
    let Some(claim) = receipt.body.exact()? else {
        return Ok(None);
    };
    if !manifest.body.plans.iter().any(|p| p.id == claim.plan_id) {
        return Err(VerifyError::PlanNotInModel {
            plan: claim.plan_id,
            model: manifest_id,
        });
    }
    Ok(Some(claim.plan_id))
}

/// Decodes plan bytes, checking that they are the plan with id `plan_id`.
pub fn decode_plan(plan_id: &BlobId, bytes: &[u8], limits: &PlanLimits) -> Result<Plan, VerifyError> {
    let plan_error = |reason: String| VerifyError::Plan { plan: *plan_id, reason };
    let actual = BlobId::of(bytes);
    if actual != *plan_id {
        return Err(plan_error(format!("the bytes at hand hash to {actual}")));
    }
    Plan::decode(bytes, limits).map_err(|e| plan_error(format!("does not decode: {e}")))
}

fn compare(what: &'static str, receipt: Digest, computed: Digest, source: &'static str) -> Result<(), VerifyError> {
    if receipt == computed {
        Ok(())
    } else {
        Err(VerifyError::Mismatch {
            what,
            receipt,
            computed,
            source_of_computed: source,
        })
    }
}

/// Checks that named `inputs` are the ones the receipt hashed.
pub fn check_inputs(receipt: &Receipt, inputs: &[NamedTensor]) -> Result<(), VerifyError> {
    compare(
        "input hash",
        receipt.body.input_hash,
        tensors_hash(inputs),
        "the inputs at hand",
    )
}

/// Checks that `outputs` are the ones the receipt hashed.
pub fn check_outputs(receipt: &Receipt, outputs: &[NamedTensor]) -> Result<(), VerifyError> {
    compare(
        "output hash",
        receipt.body.output_hash,
        tensors_hash(outputs),
        "the outputs at hand",
    )
}

/// Checks that the receipt answers the request made with `level` and `nonce`.
pub fn check_request(receipt: &Receipt, level: VerifyLevel, nonce: u64) -> Result<(), VerifyError> {
    let body = &receipt.body;
    compare(
        "request hash",
        body.request_hash,
        request_hash(&body.model_id, &body.input_hash, level, nonce),
        "the request sent",
    )
}

/// Re-executes the receipt's exact plan on `inputs` (named as [`name_inputs`] names them) and
/// checks the input hash, output hash and trace root. `plan` must be the receipt's plan, as
/// [`check_receipt_model`] and [`decode_plan`] establish.
pub fn reexecute(
    receipt: &Receipt,
    plan: &Plan,
    inputs: &[NamedTensor],
    options: &ExecOptions,
) -> Result<ExactAnswer, VerifyError> {
    let claim = receipt.body.exact()?.ok_or(VerifyError::NothingToReexecute)?;
    if plan.id() != claim.plan_id {
        return Err(VerifyError::Plan {
            plan: claim.plan_id,
            reason: format!("the plan at hand is {}", plan.id()),
        });
    }
    check_inputs(receipt, inputs)?;
    let answer = run_exact(plan, inputs, options)?;
    compare(
        "output hash",
        receipt.body.output_hash,
        answer.output_hash,
        "re-execution",
    )?;
    compare("trace root", claim.trace_root, answer.trace_root, "re-execution")?;
    Ok(answer)
}
