/** OHIF v3 configuration served by `spinemed-node viewer` (replaces the dist's own app-config.js).
 *
 * OHIF and Orthanc's DICOMweb plugin share one origin: nginx serves OHIF and proxies /dicom-web and /wado
 * to Orthanc (Orthanc 1.10 sends no CORS headers). The roots are therefore built from the page's own
 * origin, so the same file works on any host name and port.
 *
 * Nothing here loads from outside this origin: no remote customizations, no dynamic config, no
 * service worker, no analytics.
 */
(function () {
  var origin = window.location.origin;

  /* --- SpineMed TID 1500 SRs in OHIF 3.13 ------------------------------------------------------------
   * Our measurement groups are TID 1501: each finding is a CODE (121071, DCM, "Finding") whose evidence
   * is an INFERRED FROM SCOORD POINT (SELECTED FROM the source image). OHIF 3.13 only takes coordinates
   * from a SCOORD directly in the group (TID 1410 style) or under a NUM, so it finds none here, and then
   * fails on `measurement.coords[0]` for the whole SR (TypeError in _checkIfCanAddMeasurementsToDisplaySet).
   * This hook (OHIF's documented `onBeforeSRAddMeasurement` customization) reads the group from the SR's
   * DICOMweb metadata, takes the finding points on one source image as the coordinates and the group's
   * Comment ("L4-L5: disc herniation, moderate") as the label; a level without a point is left undrawn.
   * OHIF opens an SR on its first measurement, so the localised levels are put first (a level without
   * a point first would open the SR on an empty viewport). Sites running their own OHIF 3.x can copy this
   * block and the `onBeforeSRAddMeasurement` entry below into their app-config.js.
   */
  var T = {
    ContentSequence: '0040A730', ValueType: '0040A040', ConceptName: '0040A043', CodeValue: '00080100',
    Scheme: '00080102', UID: '0040A124', TextValue: '0040A160', GraphicType: '00700023',
    GraphicData: '00700022', RefSOP: '00081199', RefClass: '00081150', RefInstance: '00081155',
    RefFrame: '00081160', FrameOfRef: '30060024',
  };
  var seriesCache = {};

  function val(item, tag) {
    var el = item && item[tag];
    return el && el.Value ? el.Value : [];
  }
  function first(item, tag) {
    return val(item, tag)[0];
  }
  function concept(item) {
    var c = first(item, T.ConceptName);
    return c ? first(c, T.Scheme) + ':' + first(c, T.CodeValue) : '';
  }
  function seriesMetadata(study, series) {
    var key = study + '/' + series;
    if (!(key in seriesCache)) {
      var xhr = new XMLHttpRequest();
      // synchronous: the hook itself is synchronous; one small request per SR series, cached
      xhr.open('GET', origin + '/dicom-web/studies/' + study + '/series/' + series + '/metadata', false);
      xhr.setRequestHeader('Accept', 'application/dicom+json');
      xhr.send(null);
      seriesCache[key] = xhr.status === 200 ? JSON.parse(xhr.responseText) : [];
    }
    return seriesCache[key];
  }
  function groupsOf(instance) {
    // the TID 1501 groups of one TID 1500 SR, in document order
    var groups = [];
    val(instance, T.ContentSequence).forEach(function (container) {
      if (concept(container) !== 'DCM:126010') {
        return;
      }
      val(container, T.ContentSequence).forEach(function (item) {
        if (concept(item) !== 'DCM:125007') {
          return;
        }
        var uid = null;
        val(item, T.ContentSequence).forEach(function (c) {
          if (concept(c) === 'DCM:112040') {
            uid = first(c, T.UID);
          }
        });
        if (uid) {
          groups.push({ uid: uid, item: item });
        }
      });
    });
    return groups;
  }
  var plans = {};
  function planFor(study, series, trackingUid) {
    // OHIF shows the SR's first measurement when it opens the SR: put the localised levels first
    // (in their cranio-caudal order), then the levels without a point.
    var instances = seriesMetadata(study, series);
    for (var k = 0; k < instances.length; k++) {
      var sop = first(instances[k], '00080018');
      var groups = groupsOf(instances[k]);
      if (!groups.some(function (g) { return g.uid === trackingUid; })) {
        continue;
      }
      if (!plans[sop]) {
        var index = {};
        groups.forEach(function (g, i) {
          index[g.uid] = i;
          g.coords = groupCoords(g.item);
          g.labels = groupLabels(g.item, []);
          g.level = '';
          val(g.item, T.ContentSequence).forEach(function (c) {
            if (concept(c) === 'DCM:112039') {
              g.level = first(c, T.TextValue);
            }
          });
        });
        var sorted = groups.filter(function (g) { return g.coords.length; })
          .concat(groups.filter(function (g) { return !g.coords.length; }));
        plans[sop] = { index: index, sorted: sorted };
      }
      return plans[sop];
    }
    return null;
  }
  function groupCoords(group) {
    var flat = [], solid = [];
    val(group, T.ContentSequence).forEach(function (item) {
      if (concept(item) !== 'DCM:121071') {
        return;
      }
      val(item, T.ContentSequence).forEach(function (ev) {
        var vt = first(ev, T.ValueType);
        if (vt === 'SCOORD' && first(ev, T.GraphicType) === 'POINT') {
          var img = val(ev, T.ContentSequence)[0];
          var ref = img && first(img, T.RefSOP);
          if (!ref) {
            return;
          }
          var sop = { ReferencedSOPClassUID: first(ref, T.RefClass), ReferencedSOPInstanceUID: first(ref, T.RefInstance) };
          if (first(ref, T.RefFrame)) {
            sop.ReferencedFrameNumber = Number(first(ref, T.RefFrame));
          }
          flat.push({ ValueType: 'SCOORD', GraphicType: 'POINT', GraphicData: val(ev, T.GraphicData).slice(0, 2), ReferencedSOPSequence: sop });
        } else if (vt === 'SCOORD3D' && first(ev, T.GraphicType) === 'POINT') {
          solid.push({ ValueType: 'SCOORD3D', GraphicType: 'POINT', GraphicData: val(ev, T.GraphicData).slice(0, 3), ReferencedFrameOfReferenceSequence: first(ev, T.FrameOfRef) });
        }
      });
    });
    if (flat.length) {
      // OHIF draws one measurement on one image: keep the points on the first finding's image
      var uid = flat[0].ReferencedSOPSequence.ReferencedSOPInstanceUID;
      var frame = flat[0].ReferencedSOPSequence.ReferencedFrameNumber || 1;
      return flat.filter(function (c) {
        return c.ReferencedSOPSequence.ReferencedSOPInstanceUID === uid && (c.ReferencedSOPSequence.ReferencedFrameNumber || 1) === frame;
      });
    }
    return solid.slice(0, 1);
  }
  function groupLabels(group, fallback) {
    var comment = '';
    val(group, T.ContentSequence).forEach(function (item) {
      if (concept(item) === 'DCM:121106' && first(item, T.ValueType) === 'TEXT') {
        comment = first(item, T.TextValue) || comment;
      }
    });
    if (!comment) {
      return fallback;
    }
    // "L4-L5: disc herniation, moderate, left; disc degeneration, mild" -> one line per finding
    var cut = comment.indexOf(': ');
    var level = cut > 0 ? comment.slice(0, cut) : '';
    var rest = cut > 0 ? comment.slice(cut + 2) : comment;
    return rest.split('; ').slice(0, 5).map(function (part) {
      return { label: level || 'Finding', value: part };
    });
  }
  function spinemedSRMeasurement(args) {
    var measurement = args.measurement;
    if (!measurement || measurement.spinemedAdapted) {
      return measurement;
    }
    measurement.spinemedAdapted = true;
    try {
      if (!measurement.coords || !measurement.coords.length) {
        var plan = planFor(args.StudyInstanceUID, args.SeriesInstanceUID, measurement.TrackingUniqueIdentifier);
        var i = plan ? plan.index[measurement.TrackingUniqueIdentifier] : undefined;
        if (i !== undefined) {
          var g = plan.sorted[i];
          measurement.TrackingUniqueIdentifier = g.uid;
          measurement.TrackingIdentifier = g.level;
          measurement.coords = g.coords;
          measurement.labels = g.labels.length ? g.labels : measurement.labels;
          if (g.coords.length) {
            measurement.graphicType = 'POINT';
            measurement.pointsLength = 1;
          }
        }
      }
    } catch (err) {
      console.warn('spinemed: could not read the measurement group', err);
    }
    if (!measurement.coords || !measurement.coords.length) {
      // not localised: nothing to draw; a coordinate without image reference makes OHIF skip it
      measurement.coords = [{ ValueType: 'SCOORD', GraphicType: 'POINT', GraphicData: [] }];
    }
    return measurement;
  }

  window.config = {
    name: 'spinemed-node viewer',
    routerBasename: '/',
    extensions: [],
    modes: [],
    // no onboarding tour over the images
    customizationService: {
      'ohif.tours': { $set: [] },
      onBeforeSRAddMeasurement: { $set: spinemedSRMeasurement },
    },
    showStudyList: true,
    maxNumberOfWebWorkers: 2,
    showWarningMessageForCrossOrigin: false,
    showCPUFallbackMessage: false,
    showLoadingIndicator: true,
    strictZSpacingForVolumeViewport: true,
    groupEnabledModesFirst: true,
    investigationalUseDialog: { option: 'never' },
    maxNumRequests: { interaction: 100, thumbnail: 10, prefetch: 10 },
    showErrorDetails: 'always',
    defaultDataSourceName: 'orthanc',
    dataSources: [
      {
        namespace: '@ohif/extension-default.dataSourcesModule.dicomweb',
        sourceName: 'orthanc',
        configuration: {
          friendlyName: 'Orthanc (spinemed-node)',
          name: 'orthanc',
          wadoUriRoot: origin + '/wado',
          qidoRoot: origin + '/dicom-web',
          wadoRoot: origin + '/dicom-web',
          qidoSupportsIncludeField: false,
          supportsReject: false,
          imageRendering: 'wadors',
          thumbnailRendering: 'wadors',
          enableStudyLazyLoad: true,
          supportsFuzzyMatching: false,
          supportsWildcard: true,
          staticWado: false,
          singlepart: 'bulkdata,video',
          bulkDataURI: { enabled: true, relativeResolution: 'studies' },
          omitQuotationForMultipartRequest: true,
        },
      },
    ],
    httpErrorHandler: function (error) {
      console.warn('DICOMweb request failed', error && error.status);
    },
  };
})();
