// Command tcgcpu times the crypto a Kubernetes control plane spends its CPU on (TLS handshakes with kubeadm's RSA-2048
// certificates and with ECDSA P-256, AES-GCM and SHA-256 bulk work) so that bench/tcg-cpu-model.sh can run it under
// qemu's TCG with each guest CPU model and compare. It prints one JSON object. Standard library only.
package main

import (
	"crypto/aes"
	"crypto/cipher"
	"crypto/ecdsa"
	"crypto/elliptic"
	"crypto/rand"
	"crypto/rsa"
	"crypto/sha256"
	"crypto/tls"
	"crypto/x509"
	"crypto/x509/pkix"
	"encoding/json"
	"flag"
	"fmt"
	"math/big"
	"net"
	"os"
	"time"
)

func certFor(key any, pub any) tls.Certificate {
	tmpl := &x509.Certificate{SerialNumber: big.NewInt(1), Subject: pkix.Name{CommonName: "kube-apiserver"},
		DNSNames: []string{"kubernetes"}, NotBefore: time.Now().Add(-time.Hour), NotAfter: time.Now().Add(time.Hour),
		KeyUsage: x509.KeyUsageDigitalSignature, ExtKeyUsage: []x509.ExtKeyUsage{x509.ExtKeyUsageServerAuth}}
	der, err := x509.CreateCertificate(rand.Reader, tmpl, tmpl, pub, key)
	if err != nil {
		fail(err)
	}
	return tls.Certificate{Certificate: [][]byte{der}, PrivateKey: key}
}

func fail(err error) {
	fmt.Fprintln(os.Stderr, "tcgcpu:", err)
	os.Exit(1)
}

// handshakes runs n full TLS 1.3 handshakes over in-memory pipes and returns the mean seconds per handshake.
func handshakes(cert tls.Certificate, n int) float64 {
	pool := x509.NewCertPool()
	leaf, err := x509.ParseCertificate(cert.Certificate[0])
	if err != nil {
		fail(err)
	}
	pool.AddCert(leaf)
	srvCfg := &tls.Config{Certificates: []tls.Certificate{cert}, SessionTicketsDisabled: true}
	cliCfg := &tls.Config{RootCAs: pool, ServerName: "kubernetes", ClientSessionCache: nil}
	start := time.Now()
	for i := 0; i < n; i++ {
		c, s := net.Pipe()
		errs := make(chan error, 1)
		go func() { errs <- tls.Server(s, srvCfg).Handshake() }()
		if err := tls.Client(c, cliCfg).Handshake(); err != nil {
			fail(err)
		}
		if err := <-errs; err != nil {
			fail(err)
		}
		c.Close()
		s.Close()
	}
	return time.Since(start).Seconds() / float64(n)
}

func main() {
	n := flag.Int("handshakes", 10, "TLS handshakes per key type")
	mib := flag.Int("mib", 8, "MiB of AES-GCM and SHA-256 work")
	flag.Parse()
	rsaKey, err := rsa.GenerateKey(rand.Reader, 2048)
	if err != nil {
		fail(err)
	}
	ecKey, err := ecdsa.GenerateKey(elliptic.P256(), rand.Reader)
	if err != nil {
		fail(err)
	}
	out := map[string]float64{
		"tls_rsa2048_ms":    1000 * handshakes(certFor(rsaKey, &rsaKey.PublicKey), *n),
		"tls_ecdsa_p256_ms": 1000 * handshakes(certFor(ecKey, &ecKey.PublicKey), *n),
	}
	buf := make([]byte, 1<<20)
	block, err := aes.NewCipher(make([]byte, 16))
	if err != nil {
		fail(err)
	}
	gcm, err := cipher.NewGCM(block)
	if err != nil {
		fail(err)
	}
	nonce := make([]byte, gcm.NonceSize())
	dst := make([]byte, 0, len(buf)+gcm.Overhead())
	start := time.Now()
	for i := 0; i < *mib; i++ {
		dst = gcm.Seal(dst[:0], nonce, buf, nil)
	}
	out["aes128gcm_mib_s"] = float64(*mib) / time.Since(start).Seconds()
	start = time.Now()
	for i := 0; i < *mib; i++ {
		sha256.Sum256(buf)
	}
	out["sha256_mib_s"] = float64(*mib) / time.Since(start).Seconds()
	if err := json.NewEncoder(os.Stdout).Encode(out); err != nil {
		fail(err)
	}
}
