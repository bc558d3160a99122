/* cblas_sgemm that sends single-row products to cblas_sgemv.
 *
 * MLX computes every float32 matmul with cblas_sgemm. When one token is decoded each product
 * is a single row times a weight matrix (M == 1); OpenBLAS's sgemm then packs and pads the
 * whole matrix and streams it at about half the bandwidth of its sgemv. This library is loaded
 * with RTLD_GLOBAL before OpenBLAS joins the global scope (see cpu.py), so MLX's calls
 * land here: single rows go to sgemv, everything else to OpenBLAS's sgemm unchanged.
 */
#include <string.h>

#ifdef __cplusplus /* CC may name a C++ compiler: C's names all the same, or Python finds no function */
extern "C" {
#endif

typedef void (*sgemm_fn)(int order, int trans_a, int trans_b, int m, int n, int k, float alpha,
                         const float *a, int lda, const float *b, int ldb, float beta, float *c,
                         int ldc);
typedef void (*sgemv_fn)(int order, int trans, int m, int n, float alpha, const float *a, int lda,
                         const float *x, int incx, float beta, float *y, int incy);

enum { ROW_MAJOR = 101, NO_TRANS = 111, TRANS = 112 };

static sgemm_fn blas_sgemm;
static sgemv_fn blas_sgemv;

/* Called from Python with OpenBLAS's functions right after this library is loaded. */
void nanogpt_gemv_shim_connect(sgemm_fn sgemm, sgemv_fn sgemv) {
    blas_sgemm = sgemm;
    blas_sgemv = sgemv;
}

void cblas_sgemm(int order, int trans_a, int trans_b, int m, int n, int k, float alpha,
                 const float *a, int lda, const float *b, int ldb, float beta, float *c, int ldc) {
    if (order != ROW_MAJOR || m != 1) {
        blas_sgemm(order, trans_a, trans_b, m, n, k, alpha, a, lda, b, ldb, beta, c, ldc);
        return;
    }
    /* c (1 x n) = alpha * a (1 x k) . op(b) (k x n) + beta * c, i.e. c = alpha * op(b)^T a + beta * c.
     * A transposed a is stored as a column (k x 1), so its elements are lda apart. */
    if (beta == 0.0f)
        memset(c, 0, (size_t)n * sizeof(float)); /* BLAS never reads c when beta is 0 */
    int inc_a = trans_a == NO_TRANS ? 1 : lda;
    if (trans_b == NO_TRANS) /* b is k x n */
        blas_sgemv(ROW_MAJOR, TRANS, k, n, alpha, b, ldb, a, inc_a, beta, c, 1);
    else /* b is stored n x k */
        blas_sgemv(ROW_MAJOR, NO_TRANS, n, k, alpha, b, ldb, a, inc_a, beta, c, 1);
}
#ifdef __cplusplus
}
#endif
