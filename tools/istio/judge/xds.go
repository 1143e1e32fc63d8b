// xds: what istiod's own config-to-xDS generation would push to each proxy.
//
// Istio's fake discovery server (istio.io/istio/pilot/test/xds, the harness Istio's own tests use to run
// pilot's real generators without a cluster) is fed Istio objects and Kubernetes objects (Services, Pods,
// EndpointSlices); for every proxy asked for, the listeners, clusters and routes istiod would push are
// written as JSON (proto field names, as Envoy's own config dump writes them).
//
// Input (stdin, JSON):
//
//	{"istio": "<multi-document YAML>", "kubernetes": "<multi-document YAML>",
//	 "proxies": [{"name": "...", "type": "sidecar" | "router", "namespace": "...", "ip": "10.0.0.1",
//	              "labels": {...}, "serviceAccount": "..."}]}
//
// Output (stdout, JSON): {"<name>": {"listeners": [...], "clusters": [...], "routes": [...]}}.
package main

import (
	"encoding/json"
	"fmt"
	"os"

	"google.golang.org/protobuf/encoding/protojson"
	"google.golang.org/protobuf/proto"

	"istio.io/istio/pilot/pkg/config/kube/crd"
	"istio.io/istio/pilot/pkg/model"
	"istio.io/istio/pilot/test/xds"
	"istio.io/istio/pkg/test"
)

// istioVersion is what the proxies report; istiod gates some generated config on the proxy's version.
const istioVersion = "1.31.0"

type proxySpec struct {
	Name           string            `json:"name"`
	Type           string            `json:"type"`
	Namespace      string            `json:"namespace"`
	IP             string            `json:"ip"`
	Labels         map[string]string `json:"labels"`
	ServiceAccount string            `json:"serviceAccount"`
}

type input struct {
	Istio      string      `json:"istio"`
	Kubernetes string      `json:"kubernetes"`
	Proxies    []proxySpec `json:"proxies"`
}

type proxyConfig struct {
	Listeners []json.RawMessage `json:"listeners"`
	Clusters  []json.RawMessage `json:"clusters"`
	Routes    []json.RawMessage `json:"routes"`
}

// runXDS reads the input JSON on stdin and writes each proxy's xDS as JSON on stdout.
func runXDS() error {
	var in input
	if err := json.NewDecoder(os.Stdin).Decode(&in); err != nil {
		return fmt.Errorf("reading the input JSON on stdin: %w", err)
	}
	configs, _, err := crd.ParseInputs(in.Istio)
	if err != nil {
		return fmt.Errorf("parsing the Istio objects: %w", err)
	}
	out := map[string]proxyConfig{}
	// test.Wrap is Istio's own adapter for running its test harness outside `go test`: a Fatal inside
	// the fake server becomes the returned error.
	err = test.Wrap(func(t test.Failer) {
		server := xds.NewFakeDiscoveryServer(t, xds.FakeOptions{Configs: configs, KubernetesObjectString: in.Kubernetes})
		for _, spec := range in.Proxies {
			dumped, err := dump(server, spec)
			if err != nil {
				t.Fatalf("proxy %s: %v", spec.Name, err)
			}
			out[spec.Name] = dumped
		}
	})
	if err != nil {
		return err
	}
	encoder := json.NewEncoder(os.Stdout)
	encoder.SetIndent("", " ")
	return encoder.Encode(out)
}

func dump(server *xds.FakeDiscoveryServer, spec proxySpec) (proxyConfig, error) {
	nodeType := model.SidecarProxy
	switch spec.Type {
	case "sidecar":
	case "router":
		nodeType = model.Router
	default:
		return proxyConfig{}, fmt.Errorf("type %q: expected sidecar or router", spec.Type)
	}
	proxy := server.SetupProxy(&model.Proxy{
		Type:            nodeType,
		ID:              spec.Name + "." + spec.Namespace,
		IPAddresses:     []string{spec.IP},
		ConfigNamespace: spec.Namespace,
		Labels:          spec.Labels,
		Metadata: &model.NodeMetadata{
			Namespace:      spec.Namespace,
			Labels:         spec.Labels,
			ServiceAccount: spec.ServiceAccount,
			IstioVersion:   istioVersion,
		},
	})
	listeners := server.Listeners(proxy)
	var result proxyConfig
	var err error
	if result.Listeners, err = marshalAll(listeners); err != nil {
		return result, err
	}
	if result.Clusters, err = marshalAll(server.Clusters(proxy)); err != nil {
		return result, err
	}
	result.Routes, err = marshalAll(server.RoutesFromListeners(proxy, listeners))
	return result, err
}

func marshalAll[M proto.Message](messages []M) ([]json.RawMessage, error) {
	options := protojson.MarshalOptions{UseProtoNames: true}
	out := make([]json.RawMessage, 0, len(messages))
	for _, message := range messages {
		encoded, err := options.Marshal(message)
		if err != nil {
			return nil, err
		}
		out = append(out, encoded)
	}
	return out, nil
}
