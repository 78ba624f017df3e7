//! Property tests: the manifest codec round-trips exactly and never panics on arbitrary bytes.

use proptest::prelude::*;
use vouch_crypto::SecretKey;
use vouch_types::{
    BlobId, DType, Dim, Manifest, ManifestBody, ManifestLimits, ModelFile, ModelFormat, PlanRef, TensorSpec,
};

fn dim() -> impl Strategy<Value = Dim> {
    prop_oneof![
        Just(Dim::Unknown),
        any::<u64>().prop_map(Dim::Fixed),
        "[a-z_]{1,12}".prop_map(Dim::Named),
    ]
}

fn spec() -> impl Strategy<Value = TensorSpec> {
    (
        "[a-z_:./0-9]{1,24}",
        1i32..=23,
        proptest::option::of(proptest::collection::vec(dim(), 0..6)),
    )
        .prop_map(|(name, code, shape)| TensorSpec {
            name,
            dtype: DType::from_onnx_code(code).unwrap_or(DType::Float32),
            shape,
        })
}

fn unique_by_name(specs: Vec<TensorSpec>) -> Vec<TensorSpec> {
    let mut out: Vec<TensorSpec> = Vec::new();
    for spec in specs {
        if !out.iter().any(|s| s.name == spec.name) {
            out.push(spec);
        }
    }
    out
}

prop_compose! {
    fn manifest()(
        seed in any::<[u8; 32]>(),
        namespace in "[a-z0-9][a-z0-9._-]{0,20}",
        model in "[a-z0-9][a-z0-9._-]{0,20}",
        version in "[0-9a-zA-Z][0-9a-zA-Z.+_-]{0,20}",
        path in "[a-z0-9_-]{1,12}(/[a-z0-9_-]{1,12}){0,2}\\.onnx",
        file_bytes in proptest::collection::vec(any::<u8>(), 0..64),
        size in any::<u64>(),
        plan_seeds in proptest::collection::btree_set(any::<u64>(), 0..3),
        inputs in proptest::collection::vec(spec(), 0..5),
        outputs in proptest::collection::vec(spec(), 0..5),
        license in proptest::option::of("[A-Za-z0-9.-]{1,20}"),
        description in "\\PC{0,80}",
    ) -> Manifest {
        let key = SecretKey::from_seed(seed);
        let body = ManifestBody {
            name: format!("{namespace}/{model}").parse().expect("generated name is valid"),
            version: version.parse().expect("generated version is valid"),
            format: ModelFormat::Onnx,
            files: vec![ModelFile { path, blob: BlobId::of(&file_bytes), size }],
            plans: plan_seeds
                .into_iter()
                .map(|seed| PlanRef { id: BlobId::of(&seed.to_le_bytes()), size: seed })
                .collect(),
            inputs: unique_by_name(inputs),
            outputs: unique_by_name(outputs),
            license,
            description,
            publisher: key.public_key(),
        };
        body.sign(&key).expect("publisher signs")
    }
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(256))]

    #[test]
    fn decode_of_encode_is_identity(manifest in manifest()) {
        let bytes = manifest.encode();
        let decoded = Manifest::decode(&bytes, &ManifestLimits::default()).expect("valid manifest decodes");
        prop_assert_eq!(&decoded, &manifest);
        prop_assert_eq!(decoded.encode(), bytes);
    }

    #[test]
    fn encode_of_decode_is_identity_for_mutated_bytes(manifest in manifest(), index in any::<prop::sample::Index>(), value in any::<u8>()) {
        // Whatever a mutated manifest decodes to (almost always nothing: the signature breaks),
        // it must re-encode to exactly the bytes it came from.
        let mut bytes = manifest.encode();
        let i = index.index(bytes.len());
        bytes[i] = value;
        if let Ok(decoded) = Manifest::decode(&bytes, &ManifestLimits::default()) {
            prop_assert_eq!(decoded.encode(), bytes);
        }
    }

    #[test]
    fn arbitrary_bytes_never_panic(bytes in proptest::collection::vec(any::<u8>(), 0..2048)) {
        let _ = Manifest::decode(&bytes, &ManifestLimits::default());
    }

    #[test]
    fn truncations_are_refused(manifest in manifest(), cut in any::<prop::sample::Index>()) {
        let bytes = manifest.encode();
        let len = cut.index(bytes.len());
        prop_assert!(Manifest::decode(&bytes[..len], &ManifestLimits::default()).is_err());
    }
}
