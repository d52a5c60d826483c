//! `tensor_list!`: a list of named tensors written once.
//!
//! The model holds its tensors in small lists (one block's parameters, one layer's activations,
//! the backward's scratch). Each list is written once, as `field: [shape] = "HF name"` lines, and
//! the macro derives everything else from that one place: the struct, the tensors in list order
//! (shared and mutable), their names, shapes and lengths, and the allocation and resizing of
//! backend buffers. A list's order is the order of its lines; parameter lists follow Hugging Face's
//! order, which checkpoints and the reference-log-prob cache's hash depend on.
//!
//! ```text
//! tensor_list! {
//!     /// One block's parameters.
//!     pub(super) struct Block<T> over (c) {
//!         /// `[C, 3C]` projection to q, k, v.
//!         c_attn_w: [c, 3 * c] = "attn.c_attn.weight",
//!         c_attn_b: [3 * c] = "attn.c_attn.bias",
//!     }
//! }
//! ```
//!
//! The dimensions after `over` are the arguments of the shape functions. A tensor without a name
//! (an activation) is named by its field. The list's static facts live on `List<()>`, so they
//! read without naming a tensor type: `Block::NAMES`, `Block::shapes(c)`, `Block::lens(c)`.

/// Declares a list of tensors once (see the module documentation). Generates:
///
/// - the struct, one field of type `T` per tensor;
/// - on `List<()>`: `LEN`, `NAMES` (HF names, else field names), `shapes(dims…)` and `lens(dims…)`,
///   each in list order;
/// - on `List<T>`: `refs()` and `refs_mut()` (every tensor in list order), `try_from_fn` (build
///   from one tensor per name, made in list order), and over a backend's buffers `empty(b)` (every
///   buffer of length 0) and `resize(b, dims…)` (every buffer to its length, in list order).
macro_rules! tensor_list {
    (
        $(#[$meta:meta])*
        $vis:vis struct $List:ident<$T:ident> over ($($dim:ident),+) {
            $(
                $(#[$field_meta:meta])*
                $field:ident: [$($extent:expr),+] $(= $name:literal)?,
            )+
        }
    ) => {
        $(#[$meta])*
        $vis struct $List<$T> {
            $(
                $(#[$field_meta])*
                $vis $field: $T,
            )+
        }

        #[allow(dead_code)]
        impl $List<()> {
            /// How many tensors the list holds.
            $vis const LEN: usize = 0 $(+ $crate::model::tensor_list::tensor_list!(@one $field))+;

            /// Each tensor's name, in list order: its Hugging Face name where it has one, else its
            /// field's.
            $vis const NAMES: [&'static str; $List::<()>::LEN] =
                [$($crate::model::tensor_list::tensor_list!(@name $field $($name)?)),+];

            /// Each tensor's shape, in list order.
            #[allow(clippy::too_many_arguments)]
            $vis fn shapes($($dim: usize),+) -> [Vec<usize>; $List::<()>::LEN] {
                [$(vec![$($extent),+]),+]
            }

            /// Each tensor's length (the product of its shape), in list order.
            #[allow(clippy::too_many_arguments)]
            $vis fn lens($($dim: usize),+) -> [usize; $List::<()>::LEN] {
                [$([$($extent),+].into_iter().product::<usize>()),+]
            }
        }

        #[allow(dead_code)]
        impl<$T> $List<$T> {
            /// Builds the list from `make(name)` for each tensor, called in list order.
            $vis fn try_from_fn<E>(
                mut make: impl FnMut(&'static str) -> ::core::result::Result<$T, E>,
            ) -> ::core::result::Result<Self, E> {
                Ok(Self { $($field: make($crate::model::tensor_list::tensor_list!(@name $field $($name)?))?),+ })
            }

            /// Every tensor, in list order.
            $vis fn refs(&self) -> [&$T; $List::<()>::LEN] {
                [$(&self.$field),+]
            }

            /// Every tensor, mutable, in list order.
            $vis fn refs_mut(&mut self) -> [&mut $T; $List::<()>::LEN] {
                [$(&mut self.$field),+]
            }

            /// Every tensor as an empty backend buffer.
            $vis fn empty<B: $crate::backend::Buffers<Buf = $T>>(b: &B) -> anyhow::Result<Self> {
                Self::try_from_fn(|_| b.zeros(0))
            }

            /// Resizes every buffer in place to its length for these dimensions, in list order.
            #[allow(clippy::too_many_arguments)]
            $vis fn resize<B: $crate::backend::Buffers<Buf = $T>>(
                &mut self,
                b: &B,
                $($dim: usize),+
            ) -> anyhow::Result<()> {
                for (buf, len) in self.refs_mut().into_iter().zip($List::lens($($dim),+)) {
                    b.resize(buf, len)?;
                }
                Ok(())
            }
        }
    };
    (@one $field:ident) => { 1 };
    (@name $field:ident) => { stringify!($field) };
    (@name $field:ident $name:literal) => { $name };
}

pub(crate) use tensor_list;
